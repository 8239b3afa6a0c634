"""Tests for mmcap.ops.geglu: the reference against transformers' gelu_pytorch_tanh on the
[gate ; up] halves, the custom ops' explicit backward against autograd, the stride-2 fc1 layout
of mmcap.model.mlp, opcheck, torch.compile, and (gpu marker) the CUDA kernel against the
reference under STYLE.md's tolerance rule."""

import pytest
import torch
from transformers.activations import ACT2FN

from mmcap.ops.geglu import geglu, geglu_bwd, geglu_fwd, geglu_ref


def _inputs(rows, ffn, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * ffn, generator=g, dtype=torch.float64) * 2).to(dtype)
    dy = torch.randn(rows, ffn, generator=g, dtype=torch.float64).to(dtype)
    return x, dy


def _fwd_bwd(fn, x, dy):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.double(), dx.double()


def test_reference_is_hf_gelu_tanh_on_halves():
    x, _ = _inputs(6, 8)
    assert torch.equal(geglu_ref(x), ACT2FN["gelu_pytorch_tanh"](x[:, :8]) * x[:, 8:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,ffn", [(5, 8), (64, 1024)])
def test_custom_op_matches_reference(dtype, rows, ffn):
    x, dy = _inputs(rows, ffn, dtype)
    want = _fwd_bwd(geglu_ref, x, dy)
    got = _fwd_bwd(geglu_fwd, x, dy)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit: one ulp apart at most (~2^-7)
    for name, a, b in zip(("y", "dx"), got, want):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), name


def test_model_mlp_uses_the_fused_layout(single_rank_parallel_state):
    """mlp.py's stride-2 fc1 puts [gate ; up] in the last dim: the module equals the op."""
    from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from mmcap.model.mlp import MLP
    from mmcap.model.transformer_config import build_decoder_transformer_config

    dec = get_preset("debug-gemma").decoder
    cfg = build_decoder_transformer_config(dec, ParallelConfig(), PrecisionConfig("fp32"))
    mlp = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    assert mlp.gated and mlp.activation == "gelu_tanh"
    f = dec.ffn_hidden_size
    x = torch.randn(3, 2, dec.hidden_size)
    fc1, _ = mlp.linear_fc1(x)
    gate, up = x @ mlp.linear_fc1.weight[:f].t(), x @ mlp.linear_fc1.weight[f:].t()
    assert torch.equal(geglu(fc1), geglu_ref(torch.cat([gate, up], -1)))
    assert torch.allclose(mlp(x), mlp.linear_fc2(geglu(fc1))[0], atol=0, rtol=0)


def test_opcheck():
    x, dy = _inputs(6, 8)
    torch.library.opcheck(geglu_fwd, (x.requires_grad_(True),))
    torch.library.opcheck(geglu_bwd, (dy, x.detach()))
    with pytest.raises(ValueError, match="must be even"):
        geglu_fwd(torch.randn(2, 5))


def test_torch_compile_matches_eager():
    x, dy = _inputs(6, 8)
    fn = torch.compile(geglu_fwd, backend="aot_eager", fullgraph=True)
    for a, b in zip(_fwd_bwd(fn, x, dy), _fwd_bwd(geglu_fwd, x, dy)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,ffn", [(7, 8), (8192, 9216 // 2), (4096, 14336 // 4)])
def test_kernel_matches_reference(dtype, rows, ffn):
    from mmcap.ops.kernels import load_extension

    assert load_extension("geglu") is not None, "mmcap_geglu_cuda not built"
    x, dy = (t.cuda() for t in _inputs(rows, ffn, dtype))
    truth = _fwd_bwd(geglu_ref, x.double(), dy.double())
    plain = _fwd_bwd(geglu_ref, x, dy)
    got = _fwd_bwd(geglu, x, dy)
    for name, g, p, t in zip(("y", "dx"), got, plain, truth):
        floor = 1e-6 * max(1.0, t.abs().max().item())
        assert (g - t).abs().max() <= 2 * (p - t).abs().max() + floor, name
