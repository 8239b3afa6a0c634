"""Pieces both gradient strategies of the fused LM-head loss share (mmcap.ops.softcap_ce and
mmcap.ops.softcap_ce_fwdgrad): the soft-cap, the TP reduction of the per-token statistics and
matmuls of 16-bit (or float32) inputs with float32 output and accumulation."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

__all__ = ["addmm_f32_", "mm_f32", "softcap", "tp_reduce_stats"]


def softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def tp_reduce_stats(
    m: torch.Tensor, s: torch.Tensor, tgt: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's vocab-parallel rule over the TP ``group`` (None or size 1: unchanged): the
    global max, the sum-exp rescaled to it, the target logit from the one rank holding it."""
    if group is None or dist.get_world_size(group) == 1:
        return m, s, tgt
    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)  # sync: TP
    # A rank with no real rows has m = -inf, s = 0: contributes exp(-inf) * 0 = 0.
    st = torch.stack([s * torch.exp(m - gm), tgt])
    dist.all_reduce(st, group=group)  # sync: TP (sum-exp, target from its one rank)
    return gm, st[0], st[1]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output and accumulation (cuBLAS mm.dtype for 16-bit on CUDA)."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


# cuBLAS's addmm with a float32 ``out_dtype`` accumulates 16-bit products straight into the
# float32 accumulator (C = A.B + C): no float32 temporary per tile to allocate, write, re-read
# and add (for dW: 64 tiles of 302 MB, ~40 GB of traffic at 8,192 x 256,000 x 2,304). Decided on
# first use: a torch without that CUDA overload falls back to the temporary.
_ADDMM_OUT_DTYPE: bool | None = None


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, ``acc`` float32 (a contiguous block), float32 accumulation."""
    global _ADDMM_OUT_DTYPE
    if a.dtype == torch.float32 or not a.is_cuda:
        acc.addmm_(a.float(), b.float())
        return
    if _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, NotImplementedError, TypeError) as e:
            if _ADDMM_OUT_DTYPE:  # it worked before: a real error
                raise
            _ADDMM_OUT_DTYPE = False
            warnings.warn(
                f"softcap_ce: torch.addmm(out_dtype=float32) unavailable on CUDA ({e}); the "
                "backward adds a float32 temporary per tile instead (slower)",
                stacklevel=2,
            )
    acc += torch.mm(a, b, out_dtype=torch.float32)
