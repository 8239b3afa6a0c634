"""Matmuls of 16-bit (or float32) inputs with float32 output and accumulation, for the fused
LM-head loss (mmcap.ops.softcap_ce and its forward-gradient strategy)."""

from __future__ import annotations

import warnings

import torch

__all__ = ["addmm_f32_", "mm_f32"]


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
