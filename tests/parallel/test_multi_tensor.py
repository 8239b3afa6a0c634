"""mmcap.parallel.multi_tensor: the sync-free ``_foreach`` replacements of megatron-core's
Python-loop multi-tensor fallbacks (no apex / TE) give megatron-core's results, read nothing on
the host, and are installed only over megatron-core's own fallbacks."""

import math

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer

from mmcap.parallel import cuda_factories_on_cpu
from mmcap.parallel.multi_tensor import (
    foreach_l2_norm,
    foreach_scale,
    install_multi_tensor_fallbacks,
)
from mmcap.testing.syncs import HostSyncCounter


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3,), (0,), (128, 33), (1,), (2, 3, 4)]
    f32, bf16 = torch.float32, torch.bfloat16
    dtypes = [f32, bf16, f32, f32, torch.float16, bf16]
    return [(torch.randn(s, generator=g) * 3).to(d) for s, d in zip(shapes, dtypes)]


def _norm64(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_l2_norm_matches_megatron_local_fallback():
    fp32 = [t for t in _tensors() if t.dtype == torch.float32]
    mine, per = foreach_l2_norm(0, None, [fp32], True)
    with cuda_factories_on_cpu():
        theirs, _ = mcore_utils.local_multi_tensor_l2_norm(0, None, [fp32], False)
    assert mine.shape == (1,) and mine.dtype == torch.float32
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(per, torch.stack([t.norm() for t in fp32]), rtol=1e-6, atol=0)


def test_l2_norm_mixed_dtypes_accumulates_in_float32():
    """Low-precision tensors are normed in float32 (megatron-core's fallback rounded each
    per-tensor norm to the tensor's dtype): closer to the float64 norm than bf16 rounding."""
    tensors = _tensors(1)
    mine, per = foreach_l2_norm(0, None, [tensors], True)
    assert abs(mine.item() - _norm64(tensors)) / _norm64(tensors) < 1e-6
    assert per.dtype == torch.float32 and per.shape == (len(tensors),)
    for t, n in zip(tensors, per):  # in the input order, whatever the dtype grouping
        assert abs(n.item() - _norm64([t])) <= 1e-6 * max(_norm64([t]), 1.0)


def test_l2_norm_of_nothing_is_zero():
    norm, per = foreach_l2_norm(0, None, [[]], False)
    assert norm.tolist() == [0.0] and per is None


def test_scale_matches_megatron_local_fallback():
    src = [t.float() for t in _tensors(2) if t.numel()]
    for scale in (1.0, 0.25):
        mine = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        theirs = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        foreach_scale(0, None, [src, mine], scale)
        mcore_utils.local_multi_tensor_scale(0, None, [src, theirs], scale)
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)  # same rounding: src * scale in fp32, then a bf16 copy
    inplace = [t.clone() for t in src]
    foreach_scale(0, None, [inplace, inplace], 0.5)
    for a, t in zip(inplace, src):
        assert torch.equal(a, t * 0.5)
    foreach_scale(0, None, [[], []], 2.0)  # nothing to do
    with pytest.raises(ValueError, match="2 sources for 1 destinations"):
        foreach_scale(0, None, [src[:2], src[:1]], 1.0)


def test_fallbacks_read_nothing_on_the_host():
    """megatron-core's fallback reads every per-tensor norm (what the replacement is for)."""
    tensors = [t.float() for t in _tensors(3)]
    with HostSyncCounter() as mine:
        foreach_l2_norm(0, None, [tensors], False)
        foreach_scale(0, None, [tensors, [t.clone() for t in tensors]], 0.5)
    assert mine.syncs == [], mine.table()
    with HostSyncCounter() as theirs, cuda_factories_on_cpu():
        mcore_utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    assert theirs.count() == len(tensors) + 2, theirs.table()  # each norm, the total twice


def test_install_replaces_only_megatron_local_fallbacks(monkeypatch):
    for mod in (clip_grads, mcore_optimizer):  # as megatron-core imports them without apex / TE
        monkeypatch.setattr(mod, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm)
    assert install_multi_tensor_fallbacks()
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale
    assert mcore_optimizer.multi_tensor_scale_impl is foreach_scale
    assert install_multi_tensor_fallbacks()  # idempotent

    def apex_norm(*args):  # stands for amp_C's kernels: left alone
        raise AssertionError("not called")

    def apex_scale(*args):
        raise AssertionError("not called")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", apex_norm)
    for mod in (clip_grads, mcore_optimizer):
        monkeypatch.setattr(mod, "multi_tensor_scale_impl", apex_scale)
    assert not install_multi_tensor_fallbacks()
    assert clip_grads.l2_norm_impl is apex_norm
    assert mcore_optimizer.multi_tensor_scale_impl is apex_scale


def test_megatron_clip_grad_with_the_fallbacks(single_rank_parallel_state, monkeypatch):
    """megatron-core's grad-norm and clipping through the installed fallbacks equal torch's
    clip_grad_norm_."""
    monkeypatch.setattr(clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale)
    install_multi_tensor_fallbacks()
    params = [torch.nn.Parameter(t.float()) for t in _tensors(4) if t.numel()]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    want = [p.grad.clone() for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, w in zip(ref, want):
        r.grad = w.clone()
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0)
    with cuda_factories_on_cpu():
        total = clip_grads.get_grad_norm_fp32([p.grad for p in params])
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total)
    assert isinstance(total, float)
    assert abs(total - total_ref.item()) <= 1e-5 * total_ref.item()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
