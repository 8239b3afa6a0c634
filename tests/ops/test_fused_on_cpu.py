"""MMCAP_FUSED_OPS_ON_CPU=1 runs the fused ops' autograd path (custom ops, torch math) on CPU:
same values and gradients as the references, and the custom ops' saved tensors (what the
memory model describes)."""

import pytest
import torch

from mmcap.ops.geglu import geglu, geglu_ref
from mmcap.ops.rmsnorm import rmsnorm, rmsnorm_ref
from mmcap.ops.softcap_ce import softcap_ce, softcap_ce_ref


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("fused", [False, True])
def test_fused_path_on_cpu(monkeypatch, fused):
    if fused:
        monkeypatch.setenv("MMCAP_FUSED_OPS_ON_CPU", "1")
    else:
        monkeypatch.delenv("MMCAP_FUSED_OPS_ON_CPU", raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(16, generator=g, requires_grad=True)
    y, saved = _saved(lambda: rmsnorm(x, w, 1e-6))
    assert ("mmcap_rmsnorm_fwd" in type(y.grad_fn).__name__) == fused, type(y.grad_fn).__name__
    if fused:  # input, weight, fp32 rstd per token
        assert [tuple(t.shape) for t in saved] == [(6, 16), (16,), (6,)]
    torch.testing.assert_close(y, rmsnorm_ref(x, w, 1e-6), atol=1e-6, rtol=1e-6)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(rmsnorm_ref(x, w, 1e-6).square().sum(), (x, w))
    torch.testing.assert_close((gx, gw), (rx, rw), atol=1e-5, rtol=1e-5)

    z = torch.randn(6, 32, generator=g, requires_grad=True)
    out, saved = _saved(lambda: geglu(z))
    if fused:
        assert len(saved) == 1 and saved[0].data_ptr() == z.data_ptr()  # the input only
    torch.testing.assert_close(out, geglu_ref(z), atol=1e-6, rtol=1e-6)

    h = torch.randn(10, 16, generator=g, requires_grad=True)
    wt = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[3] = -100
    loss, saved = _saved(lambda: softcap_ce(h, wt, labels, cap=30.0))
    if fused:  # no [tokens, vocab] tensor is kept
        assert all(t.numel() < 10 * 40 for t in saved if t.dim() == 2 and t.shape[1] == 40)
        assert not any(tuple(t.shape) == (10, 40) for t in saved)
    ref = softcap_ce_ref(h, wt, labels, cap=30.0)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    a = torch.autograd.grad(loss.sum(), (h, wt))
    b = torch.autograd.grad(ref.sum(), (h, wt))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
