"""Tests for mmcap.ops.softcap_ce: the reference and the tiled op (torch tiles on CPU) against
unfused PyTorch (logits -> soft-cap -> cross-entropy) for loss, dh and dW over caps,
ignore_index, vocabulary padding, chunkings and dtypes; vocab-parallel TP=2 / TP=4 on gloo
against TP=1; opcheck and torch.compile of the custom ops; the CUDA kernels (gpu marker)
against the reference under STYLE.md's tolerance rule."""

import functools

import pytest
import torch
import torch.nn.functional as F

from mmcap.ops.softcap_ce import (
    IGNORE_INDEX,
    softcap_ce,
    softcap_ce_bwd,
    softcap_ce_fused,
    softcap_ce_fwd,
    softcap_ce_ref,
)
from mmcap.ops.softcap_ce_fwdgrad import (
    forward_grad_token_chunk,
    softcap_ce_chunk_grads,
    softcap_ce_chunk_logits,
)
from mmcap.testing import DistributedWorkers

IMPLS = {
    "ref": softcap_ce_ref,
    "fused": functools.partial(softcap_ce_fused, grad_strategy="recompute"),
    "fused_fwd": functools.partial(softcap_ce_fused, grad_strategy="forward"),
}
# float64 everywhere but the fused op's float32 tiles: 1e-5 is ~100x the float32 rounding of
# a 50-row softmax over |logits| < 30, far below any masking / soft-cap / chunking bug.
F32_TOL = 1e-5


def _problem(n=37, d=16, v_pad=52, v=45, ignore_every=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v_pad, d, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE_INDEX
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    return h, w, labels, grad


def _grad(impl: str, grad: torch.Tensor) -> torch.Tensor:
    """The loss gradient an impl is tested with: the forward-gradient strategy needs the same
    value on every non-ignored token (a sum / mean of the losses, x a loss scale), the others
    take any."""
    return torch.full_like(grad, 0.37) if impl == "fused_fwd" else grad


def _unfused(h, w, labels, cap, vocab_size):
    """What the model did before: full logits, soft-cap, padding masked, cross-entropy."""
    z = h @ w.t()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    z = z.masked_fill(torch.arange(w.shape[0]) >= vocab_size, torch.finfo(z.dtype).min)
    return F.cross_entropy(z.double(), labels, reduction="none", ignore_index=IGNORE_INDEX)


def _loss_and_grads(fn, h, w, labels, grad, **kw):
    h, w = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    loss = fn(h, w, labels, **kw)
    dh, dw = torch.autograd.grad(loss, (h, w), grad.to(loss.dtype))
    return loss.double(), dh.double(), dw.double()


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cap", [None, 30.0, 2.0])
@pytest.mark.parametrize("chunks", [(8, 7), (64, 1024), (1, 1)])
def test_matches_unfused(impl, cap, chunks):
    h, w, labels, grad = _problem()
    grad = _grad(impl, grad)
    want = _loss_and_grads(_unfused, h, w, labels, grad, cap=cap, vocab_size=45)
    got = _loss_and_grads(
        IMPLS[impl], h, w, labels, grad, cap=cap, vocab_size=45,
        token_chunk=chunks[0], vocab_chunk=chunks[1],
    )  # fmt: skip
    tol = 1e-12 if impl == "ref" else F32_TOL
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), name
    assert got[0][labels == IGNORE_INDEX].abs().max() == 0
    assert got[2][45:].abs().max() == 0  # padded rows: no gradient


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_all_ignored_chunk_is_zero_not_nan(impl):
    h, w, labels, grad = _problem(n=16)
    labels[:8] = IGNORE_INDEX  # the whole first token chunk
    loss, dh, dw = _loss_and_grads(IMPLS[impl], h, w, labels, _grad(impl, grad), cap=30.0,
                                   token_chunk=8)  # fmt: skip
    assert torch.isfinite(loss).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert loss[:8].abs().max() == 0 and dh[:8].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_low_precision_inputs_tolerance_rule(impl, dtype):
    """STYLE.md: error vs a float64 truth at most ~2x that of unfused torch in `dtype` (both
    see the same rounded inputs; the op accumulates in float32)."""
    h, w, labels, grad = _problem(n=64, d=32, dtype=dtype)
    grad = _grad(impl, grad)
    truth = _loss_and_grads(_unfused, h.double(), w.double(), labels, grad, cap=30.0,
                            vocab_size=45)  # fmt: skip
    plain = _loss_and_grads(_unfused, h, w, labels, grad, cap=30.0, vocab_size=45)
    got = _loss_and_grads(IMPLS[impl], h, w, labels, grad, cap=30.0, vocab_size=45,
                          token_chunk=16, vocab_chunk=16)  # fmt: skip
    floor = 1e-6 if dtype == torch.float32 else 0.0  # float32 unfused can be ~exact
    for name, g, p, t in zip(("loss", "dh", "dw"), got, plain, truth):
        assert got[0].dtype == torch.float64  # (float32 loss, upcast by the helper)
        assert (g - t).abs().max() <= 2 * (p - t).abs().max() + floor, name


def test_input_errors_name_the_argument():
    h, w, labels, _ = _problem()
    with pytest.raises(ValueError, match="cap=0"):
        softcap_ce(h, w, labels, cap=0.0)
    with pytest.raises(ValueError, match="labels must be int64"):
        softcap_ce(h, w, labels.int(), cap=None)
    with pytest.raises(ValueError, match="weight"):
        softcap_ce(h, w[:, :3], labels, cap=None)
    bad = labels.clone()
    bad[3] = 45  # a TP padding row, not a real token
    with pytest.raises(ValueError, match=r"labels \[45\] at tokens \[3\]"):
        softcap_ce(h, w, bad, cap=None, vocab_size=45)


def test_dispatch_on_cpu_is_the_reference(monkeypatch):
    """CPU (and MMCAP_DISABLE_KERNELS=1) runs softcap_ce_ref: bitwise the same result."""
    h, w, labels, grad = _problem()
    want = _loss_and_grads(softcap_ce_ref, h, w, labels, grad, cap=30.0, vocab_size=45)
    monkeypatch.setenv("MMCAP_DISABLE_KERNELS", "1")
    got = _loss_and_grads(softcap_ce, h, w, labels, grad, cap=30.0, vocab_size=45)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.setenv("MMCAP_DISABLE_KERNELS", "maybe")
    with pytest.raises(ValueError, match="MMCAP_DISABLE_KERNELS"):
        softcap_ce(h, w, labels, cap=30.0)


def test_opcheck_custom_ops():
    h, w, labels, grad = _problem(dtype=torch.float32)
    torch.library.opcheck(softcap_ce_fwd, (h, w, labels, 30.0, 0, 45, 8, 16))
    torch.library.opcheck(softcap_ce_fwd, (h, w, labels, None, 5, 40, 64, 7))
    stats = softcap_ce_fwd(h, w, labels, 30.0, 0, 45, 8, 16)
    lse = stats[0] + torch.log(stats[1])
    torch.library.opcheck(softcap_ce_bwd, (h, w, labels, lse, grad.float(), 30.0, 0, 45, 8, 16))
    no_dw = (h, w, labels, lse, grad.float(), 30.0, 0, 45, 8, 16, True, False)
    torch.library.opcheck(softcap_ce_bwd, no_dw)
    torch.library.opcheck(softcap_ce_chunk_logits, (h, w, labels, 30.0, 0, 45))
    torch.library.opcheck(softcap_ce_chunk_logits, (h, w, labels, None, 5, 40))
    z, stats = softcap_ce_chunk_logits(h, w, labels, 30.0, 0, 45)
    lse = stats[0] + torch.log(stats[1])
    dw = torch.zeros(45, h.shape[1])
    torch.library.opcheck(softcap_ce_chunk_grads, (z.clone(), h, w, labels, lse, 30.0, 0, True, dw))
    no_grads = (z.clone(), h, w, labels, lse, None, 0, False, torch.zeros(0, 16))
    torch.library.opcheck(softcap_ce_chunk_grads, no_grads)


@pytest.mark.parametrize("strategy", ["recompute", "forward"])
def test_torch_compile_matches_eager(strategy):
    h, w, labels, grad = _problem(dtype=torch.float32)
    grad = torch.full_like(grad, 0.5) if strategy == "forward" else grad
    fn = torch.compile(softcap_ce_fused, backend="aot_eager", fullgraph=True)
    kw = {"cap": 30.0, "vocab_size": 45, "token_chunk": 8, "vocab_chunk": 16,
          "grad_strategy": strategy}  # fmt: skip
    got = _loss_and_grads(fn, h, w, labels, grad, **kw)
    want = _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    if strategy == "forward":  # compiled, a per-token gradient is still refused
        with pytest.raises(RuntimeError, match="MMCAP_SOFTCAP_CE_GRAD=recompute"):
            _loss_and_grads(fn, h, w, labels, torch.randn_like(grad), **kw)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


class _TileKernelStandIn:
    """The csrc/softcap_ce tile contract (softcap_ce.h) in torch, to run the driver's kernel
    branch (in-place running statistics, dlogits buffers, column offsets) on the CPU."""

    @staticmethod
    def _capped(z, cap):
        if cap <= 0:
            return z, torch.ones_like(z)
        t = torch.tanh(z / cap)
        return cap * t, 1 - t * t

    def tile_stats(self, logits, labels, m, s, tgt, col_offset, cap):
        c, _ = self._capped(logits, cap)
        new_m = torch.maximum(m, c.max(-1).values)
        s.copy_(s * torch.exp(m - new_m) + torch.exp(c - new_m[:, None]).sum(-1))
        m.copy_(new_m)
        col = labels - col_offset
        hit = (col >= 0) & (col < c.shape[1])
        tgt.copy_(torch.where(hit, c.gather(1, col.clamp(0, c.shape[1] - 1)[:, None])[:, 0], tgt))

    def tile_grad(self, logits, out, labels, lse, g, col_offset, cap):
        c, dcap = self._capped(logits, cap)
        cols = torch.arange(c.shape[1])[None, :] + col_offset
        d = (torch.exp(c - lse[:, None]) - (cols == labels[:, None]).float()) * dcap * g[:, None]
        out.copy_(d.to(out.dtype))


@pytest.mark.parametrize("strategy", ["recompute", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_kernel_branch_of_the_driver(monkeypatch, dtype, cap, strategy):
    import mmcap.ops.softcap_ce as mod
    import mmcap.ops.softcap_ce_fwdgrad as fwd

    h, w, labels, grad = _problem(dtype=dtype)
    grad = torch.full_like(grad, 0.37) if strategy == "forward" else grad
    kw = {"cap": cap, "vocab_size": 45, "token_chunk": 8, "vocab_chunk": 7,
          "grad_strategy": strategy}  # fmt: skip
    want = _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    for m in (mod, fwd):
        monkeypatch.setattr(m, "use_kernel", lambda op, *ts: True)
        monkeypatch.setattr(m, "load_extension", lambda op: _TileKernelStandIn())
    got = _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 dlogits before the matmuls
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), name


# --- the forward-gradient strategy ------------------------------------------------------------
def test_forward_strategy_rejects_per_token_weights():
    """Its dW is exact only for one gradient value over the non-ignored tokens: anything else
    is an error on CPU (on CUDA: a held flag the trainer reads with its step statistics)."""
    h, w, labels, grad = _problem()
    kw = {"cap": 30.0, "vocab_size": 45, "grad_strategy": "forward"}
    with pytest.raises(ValueError, match="MMCAP_SOFTCAP_CE_GRAD=recompute"):
        _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    # ignored tokens may carry anything (their loss is 0), and so may an all-ignored batch
    g = torch.full_like(grad, 2.0).masked_fill(labels == IGNORE_INDEX, -7.0)
    got = _loss_and_grads(softcap_ce_fused, h, w, labels, g, **kw)
    want = _loss_and_grads(_unfused, h, w, labels, g, cap=30.0, vocab_size=45)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= F32_TOL * max(1.0, b.abs().max().item())
    ignored = torch.full_like(labels, IGNORE_INDEX)
    _, dh, dw = _loss_and_grads(softcap_ce_fused, h, w, ignored, grad, **kw)
    assert dh.abs().max() == 0 and dw.abs().max() == 0
    # a non-finite loss gradient is not a weighting: non-finite gradients (the trainer skips)
    _, dh, dw = _loss_and_grads(softcap_ce_fused, h, w, labels, torch.full_like(grad, float("nan")),
                                **kw)  # fmt: skip
    assert dh.isnan().any() and dw.isnan().any()


@pytest.mark.parametrize("strategy", ["recompute", "forward"])
def test_frozen_inputs_skip_their_gemms(monkeypatch, strategy):
    """A frozen LM head gets no gradient and costs no dW matmul (dz^T @ h); without autograd
    only the forward statistics run (no gradient matmul at all)."""
    import mmcap.ops.softcap_ce as mod
    import mmcap.ops.softcap_ce_fwdgrad as fwd

    h, w, labels, grad = _problem(dtype=torch.float32)
    grad = torch.full_like(grad, 0.5)
    kw = {"cap": 30.0, "vocab_size": 45, "token_chunk": 8, "vocab_chunk": 16,
          "grad_strategy": strategy}  # fmt: skip
    want = _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    calls, real = [], mod.addmm_f32_

    def recording(acc, a, b):  # b is h's chunk for dW, W's rows for dh
        calls.append(b.untyped_storage().data_ptr() == h.untyped_storage().data_ptr())
        real(acc, a, b)

    for m in (mod, fwd):
        monkeypatch.setattr(m, "addmm_f32_", recording)
    hh = h.detach().requires_grad_(True)
    loss = softcap_ce_fused(hh, w, labels, **kw)  # w frozen
    (dh,) = torch.autograd.grad(loss, hh, grad.float())
    assert (dh.double() - want[1]).abs().max() <= F32_TOL
    assert not any(calls), calls  # no dW matmul
    _loss_and_grads(softcap_ce_fused, h, w, labels, grad, **kw)
    assert any(calls)  # (the recording sees dW matmuls when W trains)
    calls.clear()
    with torch.no_grad():
        out = softcap_ce_fused(h, w, labels, **kw)
    assert not calls and not out.requires_grad
    torch.testing.assert_close(out, loss.detach())


def test_strategy_switch(monkeypatch):
    h, w, labels, _ = _problem(dtype=torch.float32)
    h.requires_grad_(True)
    for env, name in (("", "Forward"), ("forward", "Forward"), ("recompute", "_SoftcapCEBackward")):
        monkeypatch.setenv("MMCAP_SOFTCAP_CE_GRAD", env)
        loss = softcap_ce_fused(h, w, labels, cap=30.0)
        assert name in type(loss.grad_fn).__name__, (env, type(loss.grad_fn).__name__)
    monkeypatch.setenv("MMCAP_SOFTCAP_CE_GRAD", "eager")
    with pytest.raises(ValueError, match="MMCAP_SOFTCAP_CE_GRAD='eager'"):
        softcap_ce_fused(h, w, labels, cap=30.0)
    with pytest.raises(ValueError, match="grad_strategy='x'"):
        softcap_ce_fused(h, w, labels, cap=30.0, grad_strategy="x")
    # the default tile: 1 GiB of float32 logits over the shard, a power of two of tokens
    assert forward_grad_token_chunk(256000) == 1024 and forward_grad_token_chunk(64000) == 4096
    assert forward_grad_token_chunk(45) == 1 << 22 and forward_grad_token_chunk(10**9) == 16


# --- vocab-parallel on gloo -------------------------------------------------------------------
WORLD = 4


def _tp_case(impl: str, tp: int, vocab_size: int, cap):
    """Each TP group of size `tp` computes the loss of the same problem on its vocab shards."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    rank = dist.get_rank()
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, WORLD, tp)]
    group = groups[rank // tp]
    tp_rank = rank % tp
    h, w, labels, grad = _problem(v_pad=52, v=vocab_size)
    grad = _grad(impl, grad)
    local = w.shape[0] // tp
    h = h.detach().requires_grad_(True)
    w_shard = w[tp_rank * local : (tp_rank + 1) * local].detach().requires_grad_(True)
    # megatron's input mapping: identity forward, all-reduce of the partial dh in backward
    h_in = copy_to_tensor_model_parallel_region(h, group=group) if tp > 1 else h
    loss = IMPLS[impl](h_in, w_shard, labels, cap=cap, vocab_start=tp_rank * local,
                       vocab_size=vocab_size, tp_group=group, token_chunk=8, vocab_chunk=5)  # fmt: skip
    loss.backward(grad.to(loss.dtype))
    shards = [torch.empty_like(w_shard.grad) for _ in range(tp)]
    dist.all_gather(shards, w_shard.grad, group=group)
    return loss.detach(), h.grad, torch.cat(shards)


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD, timeout=120) as w:
        yield w


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("vocab_size,cap", [(45, 30.0), (30, None)])
def test_vocab_parallel_equals_tp1(workers, impl, vocab_size, cap):
    # vocab 30 of 52 rows at TP=4: rank 3 holds padding only (no real row).
    want = _loss_and_grads(_unfused, *_problem(v=vocab_size)[:3], _grad(impl, _problem()[3]),
                           cap=cap, vocab_size=vocab_size)  # fmt: skip
    tol = 1e-12 if impl == "ref" else F32_TOL
    for tp in (1, 2, 4):
        for loss, dh, dw in workers.run(_tp_case, impl, tp, vocab_size, cap):
            for name, a, b in zip(("loss", "dh", "dw"), (loss, dh, dw), want):
                err = (a.double() - b).abs().max().item()
                assert err <= tol * max(1.0, b.abs().max().item()), (tp, name, err)


# --- the CUDA kernels -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["recompute", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,d,v_pad,v,cap",
    [(300, 64, 1000, 997, 30.0), (1030, 128, 256000, 256000, 30.0),
     (520, 64, 257024, 257024, None), (64, 32, 4096, 4000, 30.0)],
)  # fmt: skip
def test_kernel_matches_reference(dtype, n, d, v_pad, v, cap, strategy):
    from mmcap.ops.kernels import load_extension
    from mmcap.ops.softcap_ce import take_grad_check

    assert load_extension("softcap_ce") is not None, "mmcap_softcap_ce_cuda not built"
    h, w, labels, grad = _problem(n=n, d=d, v_pad=v_pad, v=v, ignore_every=7, dtype=dtype)
    grad = torch.full_like(grad, 0.37) if strategy == "forward" else grad
    h, w, labels, grad = h.cuda(), w.cuda(), labels.cuda(), grad.cuda()
    labels[:300] = IGNORE_INDEX if n > 600 else labels[:300]  # an all-ignored token chunk
    truth = _loss_and_grads(softcap_ce_ref, h.double(), w.double(), labels, grad, cap=cap,
                            vocab_size=v)  # fmt: skip
    plain = _loss_and_grads(_unfused_cuda, h, w, labels, grad, cap=cap, vocab_size=v)
    got = _loss_and_grads(softcap_ce, h, w, labels, grad, cap=cap, vocab_size=v,
                          token_chunk=256, vocab_chunk=65536, grad_strategy=strategy)  # fmt: skip
    flag = take_grad_check()
    assert flag is None or not flag.item(), "a uniform gradient was flagged"
    for name, g, p, t in zip(("loss", "dh", "dw"), got, plain, truth):
        assert torch.isfinite(g).all(), name
        floor = 1e-5 * max(1.0, t.abs().max().item())
        assert (g - t).abs().max() <= 2 * (p - t).abs().max() + floor, name
    if strategy == "forward" and n < 600:  # CUDA holds the flag of a per-token gradient
        _loss_and_grads(softcap_ce, h, w, labels, torch.randn_like(grad), cap=cap, vocab_size=v)
        assert take_grad_check().item()


def _unfused_cuda(h, w, labels, cap, vocab_size):
    ids = torch.arange(w.shape[0], device=h.device)
    z = h @ w.t()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    z = z.masked_fill(ids >= vocab_size, torch.finfo(z.dtype).min)
    return F.cross_entropy(z.float(), labels, reduction="none", ignore_index=IGNORE_INDEX)
