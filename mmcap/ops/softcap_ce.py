"""Fused LM head + soft-capped cross-entropy, vocab-parallel:
``loss[t] = CE(cap * tanh((h @ W_shard^T) / cap), labels)[t]`` per token, without the logits.

Inputs are this TP rank's hidden states ``h`` [tokens, d] (the full sequence: the caller does
megatron's input mapping, ``copy_to_tensor_model_parallel_region`` or the sequence-parallel
all-gather, whose backward reduces ``dh`` over TP) and vocabulary shard ``W`` [V_local, d]
holding global rows ``vocab_start ..``; rows at or past ``vocab_size`` are TP padding and are
left out (never scored, zero gradient). megatron's vocab-parallel rule: every rank reduces its
rows to a per-token (max, sum-exp, target logit) and the three are all-reduced over the TP
group (the target logit lives on one rank); ``lse = max + log(sum)``, ``loss = lse - target``,
0 where ``labels == ignore_index``. ``cap=None`` is plain cross-entropy.

Gradients, two strategies (``grad_strategy`` / ``MMCAP_SOFTCAP_CE_GRAD``):

- ``forward`` (default): computed in the forward pass, chunk by chunk of tokens, and scaled in
  backward: 3 vocabulary-sized GEMMs, float32 ``dh`` and ``dW`` held from forward to backward;
  the backward needs the same loss gradient on every non-ignored token (a sum or mean of the
  losses, which is what training does); :mod:`mmcap.ops.softcap_ce_fwdgrad`.
- ``recompute``: the work is tiled over ``token_chunk`` tokens x ``vocab_chunk`` rows, one
  float32 logits tile at a time; backward recomputes each tile's logits, turns them into
  dlogits in place and accumulates ``dh`` (float32, [tokens, d]) and ``dW`` (float32 per vocab
  chunk): 4 GEMMs, least memory, any per-token gradient.

Either skips the GEMMs of a gradient nobody needs (a frozen LM head: no dW), and without
autograd (eval) only the forward statistics run (1 GEMM).

Pieces (STYLE.md rule 5): ``csrc/softcap_ce/`` (tile kernels: soft-cap, running max / sum-exp,
target pick, dlogits; the matmuls are cuBLAS via torch), the custom ops
``mmcap::softcap_ce_fwd`` / ``mmcap::softcap_ce_bwd`` and ``mmcap::softcap_ce_chunk_logits`` /
``mmcap::softcap_ce_chunk_grads`` (this rank's tiles; fake registrations; without the extension
they run the same tiles in torch), the autograd functions (TP all-reduces between the ops) and
:func:`softcap_ce_ref`, plain autograd PyTorch over the same tiles, which CPU runs and
``MMCAP_DISABLE_KERNELS=1`` forces. On CUDA without the extension the tiled op runs its torch
tiles (the reference would keep every logits tile for autograd).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mmcap.config.constants import IGNORE_INDEX
from mmcap.ops.softcap_ce_common import addmm_f32_, mm_f32, softcap, tp_reduce_stats
from mmcap.ops.kernels import kernels_disabled, load_extension, use_fused_op, use_kernel
from mmcap.ops.softcap_ce_fwdgrad import softcap_ce_forward_grad, take_grad_check

__all__ = [
    "GRAD_ENV",
    "IGNORE_INDEX",
    "resolve_grad_strategy",
    "softcap_ce",
    "softcap_ce_fused",
    "softcap_ce_ref",
    "take_grad_check",
]

_OP = "softcap_ce"
# Tiles: 1,024 tokens x 32,768 rows = 128 MiB of float32 logits (the Gemma vocabulary at TP=1
# is 8 vocab tiles); dW accumulates per vocab tile in float32 (32,768 x d).
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 32768
GRAD_ENV = "MMCAP_SOFTCAP_CE_GRAD"
GRAD_STRATEGIES = ("forward", "recompute")


def resolve_grad_strategy(strategy: str | None = None) -> str:
    """``strategy``, else ``MMCAP_SOFTCAP_CE_GRAD``, else "forward"; checked."""
    value = strategy if strategy is not None else os.environ.get(GRAD_ENV, "") or "forward"
    if value not in GRAD_STRATEGIES:
        where = "grad_strategy" if strategy is not None else GRAD_ENV
        raise ValueError(f"softcap_ce: {where}={value!r}: use forward or recompute")
    return value


def _n_valid(vocab_start: int, vocab_size: int, local_rows: int) -> int:
    """Rows of this shard that are real vocabulary (the rest is TP padding)."""
    return max(0, min(local_rows, vocab_size - vocab_start))


def check_inputs(h, weight, labels, cap, vocab_start, vocab_size, token_chunk, vocab_chunk):
    """Shape / value checks shared by every entry; errors name the argument."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"softcap_ce: hidden [tokens, d] and weight [V_local, d] expected, got "
            f"{tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != h.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"softcap_ce: labels must be int64 [{h.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")  # fmt: skip
    if cap is not None and not cap > 0:
        raise ValueError(f"softcap_ce: cap={cap} must be > 0 (or None for no soft-cap)")
    if vocab_start < 0 or vocab_size <= 0:
        raise ValueError(f"softcap_ce: vocab_start={vocab_start}, vocab_size={vocab_size}")
    if token_chunk <= 0 or vocab_chunk <= 0:
        raise ValueError(f"softcap_ce: token_chunk={token_chunk}, vocab_chunk={vocab_chunk} "
                         "must be > 0")  # fmt: skip


# --- this rank's tiles: custom ops ------------------------------------------------------------
@torch.library.custom_op("mmcap::softcap_ce_fwd", mutates_args=())
def softcap_ce_fwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cap: float | None,
    vocab_start: int,
    n_valid: int,
    token_chunk: int,
    vocab_chunk: int,
) -> torch.Tensor:
    """Per-token statistics over this shard's first ``n_valid`` rows: float32 [3, tokens] =
    (max of capped logits, sum of exp(c - max), capped target logit or 0 if not here)."""
    n = h.shape[0]
    stats = torch.zeros(3, n, dtype=torch.float32, device=h.device)
    m, s, tgt = stats[0], stats[1], stats[2]
    m.fill_(float("-inf"))
    ext = load_extension(_OP) if use_kernel(_OP, h, weight) else None
    for t0 in range(0, n, token_chunk):
        t1 = min(n, t0 + token_chunk)
        hc, lc = h[t0:t1], labels[t0:t1].contiguous()
        for v0 in range(0, n_valid, vocab_chunk):
            v1 = min(n_valid, v0 + vocab_chunk)
            z = mm_f32(hc, weight[v0:v1].t())  # [tc, vc] float32: the one live tile
            if ext is not None:
                ext.tile_stats(z, lc, m[t0:t1], s[t0:t1], tgt[t0:t1], vocab_start + v0,
                               cap or 0.0)  # fmt: skip
                continue
            c = softcap(z, cap)
            tile_m = c.max(-1).values
            new_m = torch.maximum(m[t0:t1], tile_m)
            tile_s = torch.exp(c - tile_m[:, None]).sum(-1)
            s[t0:t1] = s[t0:t1] * torch.exp(m[t0:t1] - new_m) + tile_s * torch.exp(tile_m - new_m)
            m[t0:t1] = new_m
            col = lc - (vocab_start + v0)
            hit = (col >= 0) & (col < v1 - v0)
            picked = c.gather(1, col.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            tgt[t0:t1] = torch.where(hit, picked, tgt[t0:t1])
    return stats


@softcap_ce_fwd.register_fake
def _(h, weight, labels, cap, vocab_start, n_valid, token_chunk, vocab_chunk):
    return h.new_empty(3, h.shape[0], dtype=torch.float32)


@torch.library.custom_op("mmcap::softcap_ce_bwd", mutates_args=())
def softcap_ce_bwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    cap: float | None,
    vocab_start: int,
    n_valid: int,
    token_chunk: int,
    vocab_chunk: int,
    need_dh: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh like h: this rank's partial, dW like weight) from the global ``lse`` [tokens] and
    the loss gradient ``grad`` [tokens] (float32, 0 for ignored tokens). A gradient that is
    not needed comes back as zeros and costs no matmul (a frozen LM head: no dW GEMM)."""
    n = h.shape[0]
    dh = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device)
    dw = torch.zeros_like(weight)  # padding rows keep 0
    if not (need_dh or need_dw):
        return dh.to(h.dtype), dw
    ext = load_extension(_OP) if use_kernel(_OP, h, weight) else None
    for v0 in range(0, n_valid, vocab_chunk):
        v1 = min(n_valid, v0 + vocab_chunk)
        wc = weight[v0:v1]
        dw_acc = torch.zeros(v1 - v0 if need_dw else 0, h.shape[1], dtype=torch.float32,
                             device=h.device)  # fmt: skip
        for t0 in range(0, n, token_chunk):
            t1 = min(n, t0 + token_chunk)
            hc, lc = h[t0:t1], labels[t0:t1].contiguous()
            z = mm_f32(hc, wc.t())  # recomputed tile logits, float32
            if ext is not None:
                # float32 inputs: dlogits overwrite z in place; 16-bit: written as h's dtype
                # for the 16-bit cuBLAS matmuls below (accumulating in float32).
                dz = z if h.dtype == torch.float32 else torch.empty_like(z, dtype=h.dtype)
                ext.tile_grad(z, dz, lc, lse[t0:t1], grad[t0:t1], vocab_start + v0, cap or 0.0)
            else:
                c = softcap(z, cap)
                dz = torch.exp(c - lse[t0:t1, None])
                col = lc - (vocab_start + v0)
                hit = (col >= 0) & (col < v1 - v0)
                dz.scatter_add_(1, col.clamp(0, v1 - v0 - 1)[:, None], -hit.float()[:, None])
                dz.mul_(grad[t0:t1, None])
                if cap is not None:
                    dz.mul_(1 - (c / cap) ** 2)
                dz = dz.to(h.dtype)
            if need_dh:
                addmm_f32_(dh[t0:t1], dz, wc)
            if need_dw:
                addmm_f32_(dw_acc, dz.t(), hc)
        if need_dw:
            dw[v0:v1] = dw_acc.to(weight.dtype)
    return dh.to(h.dtype), dw


@softcap_ce_bwd.register_fake
def _(h, weight, labels, lse, grad, cap, vocab_start, n_valid, token_chunk, vocab_chunk,
      need_dh=True, need_dw=True):  # fmt: skip
    return torch.empty_like(h), torch.empty_like(weight)


# --- vocab-parallel composition ---------------------------------------------------------------
def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _SoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, cap, vocab_start, n_valid, group, tc, vc):
        stats = torch.ops.mmcap.softcap_ce_fwd(h, weight, labels, cap, vocab_start, n_valid, tc, vc)
        m, s, tgt = stats[0], stats[1], stats[2]
        m, s, tgt = tp_reduce_stats(m, s, tgt, group)
        lse = m + torch.log(s)
        ignored = labels == IGNORE_INDEX
        ctx.save_for_backward(h, weight, labels, lse, ignored)
        ctx.args = (cap, vocab_start, n_valid, tc, vc)
        return (lse - tgt).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad):
        h, weight, labels, lse, ignored = ctx.saved_tensors
        g = grad.float().masked_fill(ignored, 0.0).contiguous()
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh, dw = torch.ops.mmcap.softcap_ce_bwd(h, weight, labels, lse, g, *ctx.args, need_dh,
                                                need_dw)  # fmt: skip
        none = (None,) * 7
        return (dh if need_dh else None), (dw if need_dw else None), *none


def softcap_ce_fused(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float | None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int = VOCAB_CHUNK,
    grad_strategy: str | None = None,
) -> torch.Tensor:
    """The tiled op (kernel tiles on CUDA when built, torch tiles otherwise), gradients by
    ``grad_strategy`` (see :func:`softcap_ce`). Args as :func:`softcap_ce`."""
    vocab_size = vocab_start + weight.shape[0] if vocab_size is None else vocab_size
    strategy = resolve_grad_strategy(grad_strategy)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if strategy == "forward" and needs_grad:
        check_inputs(h, weight, labels, cap, vocab_start, vocab_size, token_chunk or 1,
                     vocab_chunk)  # fmt: skip
        return softcap_ce_forward_grad(
            h.contiguous(), weight, labels.contiguous(), cap=cap, vocab_start=vocab_start,
            n_valid=_n_valid(vocab_start, vocab_size, weight.shape[0]), tp_group=tp_group,
            token_chunk=token_chunk,
        )  # fmt: skip
    token_chunk = token_chunk or TOKEN_CHUNK
    check_inputs(h, weight, labels, cap, vocab_start, vocab_size, token_chunk, vocab_chunk)
    n_valid = _n_valid(vocab_start, vocab_size, weight.shape[0])
    return _SoftcapCE.apply(
        h.contiguous(), weight, labels.contiguous(), cap, vocab_start, n_valid, tp_group,
        token_chunk, vocab_chunk,
    )  # fmt: skip


def softcap_ce_ref(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float | None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Plain autograd PyTorch over the same tiles (float32 or wider), megatron's vocab-parallel rule
    with its ``reduce_from_tensor_model_parallel_region`` (all-reduce, identity backward).
    Keeps every tile for autograd: the CPU / reference path, not a memory saver."""
    vocab_size = vocab_start + weight.shape[0] if vocab_size is None else vocab_size
    check_inputs(h, weight, labels, cap, vocab_start, vocab_size, token_chunk, vocab_chunk)
    n_valid = _n_valid(vocab_start, vocab_size, weight.shape[0])
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():  # (a host sync; the reference runs on CPU)
        raise ValueError(
            f"softcap_ce: labels {labels[bad][:5].tolist()} at tokens "
            f"{bad.nonzero()[:5, 0].tolist()} are outside [0, vocab_size={vocab_size}) and not "
            f"ignore_index {IGNORE_INDEX}"
        )
    acc = torch.promote_types(h.dtype, torch.float32)  # float64 stays float64 (tests)
    lses, tgts = [], []
    for t0 in range(0, h.shape[0], token_chunk):
        hc, lc = h[t0 : t0 + token_chunk].to(acc), labels[t0 : t0 + token_chunk]
        # -inf (no rows) with a zero-gradient link to h and weight: a rank holding only TP
        # padding still has a graph to run backward through.
        tile_lse = [(hc @ weight[:1].to(acc).t())[:, 0] * 0 - float("inf")]
        tgt = hc.new_zeros(hc.shape[0])
        for v0 in range(0, n_valid, vocab_chunk):
            v1 = min(n_valid, v0 + vocab_chunk)
            c = softcap(hc @ weight[v0:v1].to(acc).t(), cap)
            tile_lse.append(torch.logsumexp(c, dim=-1))
            col = lc - (vocab_start + v0)
            hit = (col >= 0) & (col < v1 - v0)
            picked = c.gather(1, col.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            tgt = tgt + torch.where(hit, picked, torch.zeros_like(picked))
        # (one tile: no logsumexp over a lone -inf, whose gradient would be NaN)
        lses.append(torch.logsumexp(torch.stack(tile_lse), dim=0) if n_valid else tile_lse[0])
        tgts.append(tgt)
    lse, tgt = torch.cat(lses), torch.cat(tgts)
    if _tp_size(tp_group) > 1:
        # (imported here: the op itself needs no megatron-core, e.g. on a bare GPU box)
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
        )

        gm = lse.detach().clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=tp_group)
        # megatron's all-reduce writes into its input: give it copies, not tensors that
        # autograd saved (exp saves its output).
        total = reduce_from_tensor_model_parallel_region(torch.exp(lse - gm).clone(), tp_group)
        lse = gm + torch.log(total)
        tgt = reduce_from_tensor_model_parallel_region(tgt.clone(), group=tp_group)
    return (lse - tgt).masked_fill(labels == IGNORE_INDEX, 0.0)


def softcap_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float | None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int = VOCAB_CHUNK,
    grad_strategy: str | None = None,
) -> torch.Tensor:
    """Per-token soft-capped cross-entropy of ``h @ weight^T`` (float32 [tokens], 0 where
    ignored). On CUDA the tiled op (:func:`softcap_ce_fused`: the csrc kernels when built, its
    torch tiles otherwise); on CPU, or with ``MMCAP_DISABLE_KERNELS=1``, :func:`softcap_ce_ref`.

    Args:
        h: [tokens, d] hidden states (every TP rank the same tokens).
        weight: [V_local, d] this rank's vocabulary rows (global ``vocab_start ..``).
        labels: int64 [tokens] global vocabulary ids, ``IGNORE_INDEX`` = no loss.
        cap: soft-cap (Gemma-2: 30.0) or None.
        vocab_start: global id of ``weight[0]`` (TP rank x V_local).
        vocab_size: real vocabulary size; rows at or past it are padding. Default: no padding.
        tp_group: the TP group to all-reduce the statistics over (None: one rank).
        token_chunk / vocab_chunk: tile size of the chunked computation (token_chunk None:
            1,024 for the recomputing backward and the reference, a 1 GiB float32 tile over
            the vocabulary shard for the forward-gradient strategy).
        grad_strategy: "forward" (default; gradients computed in the forward, 3 GEMMs; needs
            the same loss gradient on every non-ignored token, i.e. a sum or mean of the
            losses: :mod:`mmcap.ops.softcap_ce_fwdgrad`) or "recompute" (the backward
            recomputes the logits, 4 GEMMs, any gradient, least memory). None: the
            ``MMCAP_SOFTCAP_CE_GRAD`` environment variable, else "forward".
    """
    on_cuda = h.is_cuda and weight.is_cuda and not kernels_disabled()
    if (on_cuda or use_fused_op(_OP, h, weight)) and h.dtype == weight.dtype:
        return softcap_ce_fused(
            h, weight, labels, cap=cap, vocab_start=vocab_start, vocab_size=vocab_size,
            tp_group=tp_group, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
            grad_strategy=grad_strategy,
        )  # fmt: skip
    return softcap_ce_ref(
        h, weight, labels, cap=cap, vocab_start=vocab_start, vocab_size=vocab_size,
        tp_group=tp_group, token_chunk=token_chunk or TOKEN_CHUNK, vocab_chunk=vocab_chunk,
    )  # fmt: skip
