"""Tests for mmcap.ops.rmsnorm: the reference against transformers' Gemma2RMSNorm, the custom
ops' explicit forward / backward against autograd of the reference, opcheck, torch.compile,
the CPU dispatch, and (gpu marker) the CUDA kernel against the reference under STYLE.md's
tolerance rule."""

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

from mmcap.model.norms import GemmaRMSNorm
from mmcap.ops.rmsnorm import rmsnorm, rmsnorm_bwd, rmsnorm_fwd, rmsnorm_ref

EPS = 1e-6


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g, dtype=torch.float64) * 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, dy


def _fwd_bwd(fn, x, w, dy):
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.double(), dx.double(), dw.double()


def test_reference_matches_hf_gemma2():
    x, w, _ = _inputs((2, 5, 64))
    hf = Gemma2RMSNorm(64, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(w)
    assert torch.equal(rmsnorm_ref(x, w, EPS), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 16), (4, 1024), (2, 2304)])
def test_custom_op_matches_reference(dtype, shape):
    """The custom ops' explicit float32 backward vs autograd through the reference."""
    x, w, dy = _inputs(shape, dtype)
    want = _fwd_bwd(lambda a, b: rmsnorm_ref(a, b, EPS), x, w, dy)
    got = _fwd_bwd(lambda a, b: rmsnorm_fwd(a, b, EPS)[0], x, w, dy)
    # float32: ~1e-6 relative rounding over a few ops; 16-bit: both round to the same grid,
    # differing by at most one unit in the last place (bf16 2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale * (shape[-1] if name == "dw" else 1)


def test_cpu_dispatch_is_the_reference_module_unchanged():
    x, w, _ = _inputs((2, 3, 32))
    norm = GemmaRMSNorm(32, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    assert torch.equal(norm(x), rmsnorm_ref(x, w, EPS))
    assert torch.equal(rmsnorm(x, w, EPS), rmsnorm_ref(x, w, EPS))


def test_opcheck():
    x, w, dy = _inputs((3, 7, 16))
    torch.library.opcheck(rmsnorm_fwd, (x.requires_grad_(True), w.requires_grad_(True), EPS))
    _, rstd = rmsnorm_fwd(x, w, EPS)
    torch.library.opcheck(rmsnorm_bwd, (dy, x.detach(), w.detach(), rstd.detach()))


def test_torch_compile_matches_eager():
    x, w, dy = _inputs((3, 7, 16))
    fn = torch.compile(lambda a, b: rmsnorm_fwd(a, b, EPS)[0], backend="aot_eager", fullgraph=True)
    for a, b in zip(
        _fwd_bwd(fn, x, w, dy), _fwd_bwd(lambda a, b: rmsnorm_fwd(a, b, EPS)[0], x, w, dy)
    ):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 16), (4096, 1024), (2048, 2304), (1024, 3584), (3, 8192)])
def test_kernel_matches_reference(dtype, shape):
    from mmcap.ops.kernels import load_extension

    assert load_extension("rmsnorm") is not None, "mmcap_rmsnorm_cuda not built"
    x, w, dy = (t.cuda() for t in _inputs(shape, dtype))
    truth = _fwd_bwd(lambda a, b: rmsnorm_ref(a, b, EPS), x.double(), w.double(), dy.double())
    plain = _fwd_bwd(lambda a, b: rmsnorm_ref(a, b, EPS), x, w, dy)
    got = _fwd_bwd(lambda a, b: rmsnorm(a, b, EPS), x, w, dy)
    for name, g, p, t in zip(("y", "dx", "dw"), got, plain, truth):
        floor = 1e-6 * max(1.0, t.abs().max().item())
        assert (g - t).abs().max() <= 2 * (p - t).abs().max() + floor, name
