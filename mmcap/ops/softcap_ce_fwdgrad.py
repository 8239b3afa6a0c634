"""softcap_ce's forward-gradient strategy: the gradients are computed in the forward pass, so the
LM head costs three vocabulary-sized GEMMs (logits, dh, dW) instead of the recomputing
backward's four (logits, logits again, dh, dW), as Liger-Kernel's fused linear cross-entropy
does.

Per token chunk of ``token_chunk`` tokens: the chunk's logits over this rank's whole vocabulary
shard (one float32 tile ``[token_chunk, n_valid]``, kept only until the chunk is done), the
per-token (max, sum-exp, target) statistics, their TP all-reduce (megatron's vocab-parallel
rule), then dlogits for a unit gradient written over the tile (the csrc/softcap_ce kernel, or
torch), ``dh_chunk = dlogits @ W`` and ``dW += dlogits^T @ h_chunk``, float32 accumulation.
Saved for backward: float32 ``dh`` [tokens, d] and ``dW`` [n_valid, d], no inputs.

The backward scales them by the incoming per-token loss gradient ``g``: ``dh`` row by row
(exact for any ``g``), ``dW`` by one scalar, which is exact only when ``g`` is the same for
every non-ignored token. That is what a sum or mean of the per-token losses gives (mmcap's
trainer: ``key_loss`` / ``microbatch_mean_loss`` times the loss scale). A different ``g``
across non-ignored tokens (per-token weights) is detected on the device without a host sync:
on CPU it raises at once; on CUDA the flag is held (:func:`take_grad_check`) and the trainer
reads it with the step's one statistics copy and stops with an error before the optimizer
step. ``MMCAP_SOFTCAP_CE_GRAD=recompute`` (or ``grad_strategy="recompute"``) takes the
recomputing backward, exact for any ``g``.

Memory (Gemma-2 2B at TP=1, 256,000 x 2,304): the float32 ``dW`` held from forward to
backward is 2.25 GiB (the recomputing backward holds a 288 MiB float32 ``dW`` tile, in
backward only), plus a 1 GiB logits tile and its 0.5 GiB bf16 dlogits (:data:`TILE_BYTES`);
about 4 GiB in all against the unfused path's 27 GiB.
"""

from __future__ import annotations

import torch

from mmcap.config.constants import IGNORE_INDEX
from mmcap.ops.softcap_ce_common import addmm_f32_, mm_f32, softcap, tp_reduce_stats
from mmcap.ops.kernels import load_extension, use_kernel

__all__ = ["TILE_BYTES", "forward_grad_token_chunk", "softcap_ce_forward_grad", "take_grad_check"]

_OP = "softcap_ce"
# The float32 logits tile of one token chunk over the whole vocabulary shard: 1 GiB (1,024
# tokens x 256,000 rows at TP=1); dlogits for 16-bit inputs take half as much again. Smaller
# chunks cost memory traffic: every chunk's dW GEMM reads and writes the whole float32 dW
# (2 x 2.36 GB at 256,000 x 2,304), 8 times for 8,192 tokens in chunks of 1,024 (38 GB, ~8 ms
# at 4.8 TB/s), 32 times in chunks of 256 (~31 ms, as much as the three GEMMs' ~40 ms).
TILE_BYTES = 2**30


def forward_grad_token_chunk(n_valid: int, tile_bytes: int = TILE_BYTES) -> int:
    """Tokens per chunk: the largest power of two (>= 16) whose float32 tile over ``n_valid``
    vocabulary rows fits ``tile_bytes``."""
    tokens = max(1, tile_bytes // (4 * max(n_valid, 1)))
    return max(16, 1 << (tokens.bit_length() - 1))


# --- this rank's tiles: custom ops ------------------------------------------------------------
@torch.library.custom_op("mmcap::softcap_ce_chunk_logits", mutates_args=())
def softcap_ce_chunk_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cap: float | None,
    vocab_start: int,
    n_valid: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [tokens, n_valid] of ``h`` over the shard's first ``n_valid`` rows,
    uncapped; float32 [3, tokens] statistics as ``softcap_ce_fwd``'s)."""
    n = h.shape[0]
    z = mm_f32(h, weight[:n_valid].t())
    stats = torch.zeros(3, n, dtype=torch.float32, device=h.device)
    m, s, tgt = stats[0], stats[1], stats[2]
    m.fill_(float("-inf"))
    if n_valid == 0:
        return z, stats
    ext = load_extension(_OP) if use_kernel(_OP, h, weight) else None
    if ext is not None:
        ext.tile_stats(z, labels, m, s, tgt, vocab_start, cap or 0.0)
        return z, stats
    c = softcap(z, cap)
    m.copy_(c.max(-1).values)
    s.copy_(torch.exp(c - m[:, None]).sum(-1))
    col = labels - vocab_start
    hit = (col >= 0) & (col < n_valid)
    tgt.copy_(torch.where(hit, c.gather(1, col.clamp(0, n_valid - 1)[:, None])[:, 0], tgt))
    return z, stats


@softcap_ce_chunk_logits.register_fake
def _(h, weight, labels, cap, vocab_start, n_valid):
    return (h.new_empty(h.shape[0], n_valid, dtype=torch.float32),
            h.new_empty(3, h.shape[0], dtype=torch.float32))  # fmt: skip


@torch.library.custom_op("mmcap::softcap_ce_chunk_grads", mutates_args=("logits", "dw"))
def softcap_ce_chunk_grads(
    logits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    cap: float | None,
    vocab_start: int,
    need_dh: bool,
    dw: torch.Tensor,
) -> torch.Tensor:
    """For a unit loss gradient on every non-ignored token: returns float32 ``dh`` [tokens, d]
    (empty [0, d] unless ``need_dh``) and adds ``dlogits^T @ h`` to the float32 ``dw``
    [n_valid, d] (left alone when it has no rows). ``logits`` (float32 [tokens, n_valid], from
    ``softcap_ce_chunk_logits``) is overwritten (dlogits, for float32 inputs)."""
    n_valid = logits.shape[1]
    d = h.shape[1]
    if n_valid == 0 or (not need_dh and dw.shape[0] == 0):
        return h.new_zeros(h.shape[0] if need_dh else 0, d, dtype=torch.float32)
    g = (labels != IGNORE_INDEX).float()
    ext = load_extension(_OP) if use_kernel(_OP, h, weight) else None
    if ext is not None:
        dz = logits if h.dtype == torch.float32 else torch.empty_like(logits, dtype=h.dtype)
        ext.tile_grad(logits, dz, labels, lse, g, vocab_start, cap or 0.0)
    else:
        c = softcap(logits, cap)
        dz = torch.exp(c - lse[:, None])
        col = labels - vocab_start
        hit = (col >= 0) & (col < n_valid)
        dz.scatter_add_(1, col.clamp(0, n_valid - 1)[:, None], -hit.float()[:, None])
        dz.mul_(g[:, None])
        if cap is not None:
            dz.mul_(1 - (c / cap) ** 2)
        dz = dz.to(h.dtype)
    if dw.shape[0]:
        addmm_f32_(dw, dz.t(), h)
    if not need_dh:
        return h.new_zeros(0, d, dtype=torch.float32)
    return mm_f32(dz, weight[:n_valid])


@softcap_ce_chunk_grads.register_fake
def _(logits, h, weight, labels, lse, cap, vocab_start, need_dh, dw):
    return h.new_empty(h.shape[0] if need_dh else 0, h.shape[1], dtype=torch.float32)


# --- the uniform-gradient check ---------------------------------------------------------------
_PENDING: dict[torch.device, torch.Tensor] = {}
GRAD_CHECK_MESSAGE = (
    "softcap_ce (forward-gradient strategy) received per-token loss gradients that differ "
    "across non-ignored tokens (per-token loss weights); its dW is exact only for a sum or mean "
    "of the per-token losses. Set MMCAP_SOFTCAP_CE_GRAD=recompute (exact for any gradient)."
)


def _check_uniform(g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The scalar gradient of the non-ignored tokens (0 if none); flags a non-uniform ``g``:
    raises on CPU (a numpy read, free there), holds a device flag on CUDA (no sync); under
    torch.compile an asynchronous assert (on CUDA a device-side assert)."""
    hi = g.masked_fill(~valid, float("-inf")).amax()
    lo = g.masked_fill(~valid, float("inf")).amin()
    bad = valid.any() & (hi > lo)  # (a NaN gradient is not flagged: it gives NaN grads, skipped)
    if torch.compiler.is_compiling():  # traceable: no host branch, no global state
        torch._assert_async(~bad, GRAD_CHECK_MESSAGE)
    elif not g.is_cuda:
        if bad.numpy():
            raise ValueError(GRAD_CHECK_MESSAGE)
    else:
        held = _PENDING.get(g.device)
        _PENDING[g.device] = bad if held is None else held | bad
    return torch.where(valid.any(), hi, torch.zeros_like(hi))


def take_grad_check(device: torch.device | str | None = None) -> torch.Tensor | None:
    """The flag (bool scalar) of non-uniform gradients held since the last call, cleared; None
    when nothing was held. On ``device`` (a device-to-device copy, no sync) when given; reading
    it is a host sync, so the trainer folds it into the step's one statistics copy."""
    flags = list(_PENDING.values())
    _PENDING.clear()
    if not flags:
        return None
    if device is not None:
        flags = [f.to(device, non_blocking=True) for f in flags]
    return flags[0] if len(flags) == 1 else torch.stack(flags).any()


# --- autograd composition ---------------------------------------------------------------------
class _SoftcapCEForwardGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, cap, vocab_start, n_valid, group, tc, need_dh, need_dw):
        n, d = h.shape
        ignored = labels == IGNORE_INDEX
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        dh = torch.empty(n, d, dtype=torch.float32, device=h.device) if need_dh else None
        rows = n_valid if need_dw else 0
        dw = torch.zeros(rows, d, dtype=torch.float32, device=h.device)
        for t0 in range(0, n, tc):
            t1 = min(n, t0 + tc)
            hc, lc = h[t0:t1], labels[t0:t1]
            z, stats = torch.ops.mmcap.softcap_ce_chunk_logits(hc, weight, lc, cap, vocab_start,
                                                               n_valid)  # fmt: skip
            m, s, tgt = tp_reduce_stats(stats[0], stats[1], stats[2], group)
            lse = m + torch.log(s)
            loss[t0:t1] = lse - tgt
            dh_c = torch.ops.mmcap.softcap_ce_chunk_grads(
                z, hc, weight, lc, lse, cap, vocab_start, need_dh, dw
            )
            if need_dh:
                dh[t0:t1] = dh_c
            del z, dh_c
        ctx.save_for_backward(dh, dw if need_dw else None, ignored)
        ctx.meta = (h.dtype, weight.shape, weight.dtype, n_valid)
        return loss.masked_fill_(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad):
        dh, dw, ignored = ctx.saved_tensors
        h_dtype, w_shape, w_dtype, n_valid = ctx.meta
        valid = ~ignored
        g = grad.float().masked_fill(ignored, 0.0)
        alpha = _check_uniform(g, valid)
        gh = gw = None
        if dh is not None:
            gh = (dh * g[:, None]).to(h_dtype)
        if dw is not None:
            gw = torch.zeros(w_shape, dtype=w_dtype, device=dw.device)  # padding rows: 0
            step = 32768  # a bounded float32 temporary (retain_graph: dw stays unscaled)
            for v0 in range(0, n_valid, step):
                v1 = min(n_valid, v0 + step)
                gw[v0:v1] = dw[v0:v1] * alpha
        return gh, gw, None, None, None, None, None, None, None, None


def softcap_ce_forward_grad(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float | None,
    vocab_start: int,
    n_valid: int,
    tp_group,
    token_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token losses with the gradients computed in the forward (module docstring). Inputs
    as checked by ``softcap_ce_fused``; ``token_chunk`` None: :func:`forward_grad_token_chunk`."""
    tc = token_chunk or forward_grad_token_chunk(n_valid)
    need_dh, need_dw = h.requires_grad, weight.requires_grad
    return _SoftcapCEForwardGrad.apply(
        h, weight, labels, cap, vocab_start, n_valid, tp_group, tc, need_dh, need_dw
    )
