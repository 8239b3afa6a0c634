"""RMSNorm with (1 + weight) scaling (Gemma-2, sandwich norms): ``x / rms(x) * (1 + w)`` with
float32 statistics, as transformers' Gemma2RMSNorm.

Three pieces (STYLE.md rule 5): the CUDA kernel ``csrc/rmsnorm/`` (module
``mmcap_rmsnorm_cuda``), the custom ops ``mmcap::rmsnorm_fwd`` / ``mmcap::rmsnorm_bwd`` (fake
registrations, autograd, torch.compile-traceable; their non-kernel implementation is the
explicit float32 formula), and :func:`rmsnorm_ref`, the plain autograd reference the model ran
before the kernel (and runs on CPU or with ``MMCAP_DISABLE_KERNELS=1``).
"""

from __future__ import annotations

import torch

from mmcap.ops.kernels import load_extension, use_fused_op, use_kernel

__all__ = ["rmsnorm", "rmsnorm_ref"]

_OP = "rmsnorm"
_MAX_KERNEL_HIDDEN = 8192  # csrc/rmsnorm/rmsnorm_api.cpp: a float32 row in shared memory


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch: float32 statistics and scale, cast back last (HF: Gemma multiplies in
    float32 before the cast)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        use_kernel(_OP, x, weight)
        and weight.dtype == x.dtype
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.shape[-1] <= _MAX_KERNEL_HIDDEN
    )


@torch.library.custom_op("mmcap::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., h], weight [h] -> (y [..., h] of x's dtype, rstd [...] float32)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if _kernel_ok(x, weight):
        y, rstd = load_extension(_OP).forward(x2, weight.contiguous(), eps)
    else:
        xf = x2.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
        y = (xf * rstd[:, None] * (1.0 + weight.float())).to(x.dtype)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mmcap::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dweight like weight); float32 math."""
    h = x.shape[-1]
    x2, dy2 = x.reshape(-1, h).contiguous(), dy.reshape(-1, h).contiguous()
    r2 = rstd.reshape(-1).contiguous()
    if _kernel_ok(x, weight):
        dx, dw = load_extension(_OP).backward(dy2, x2, weight.contiguous(), r2)
    else:
        xhat = x2.float() * r2[:, None]
        g = dy2.float() * (1.0 + weight.float())
        dx = r2[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dx, dw = dx.to(x.dtype), (dy2.float() * xhat).sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.mmcap.rmsnorm_bwd(dy.contiguous(), x, weight, rstd)
    return dx, dw, None


rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(1 + weight) over the last dim: the CUDA kernel when usable (CUDA tensors, the
    extension built, MMCAP_DISABLE_KERNELS unset, one dtype), else :func:`rmsnorm_ref`
    (``MMCAP_FUSED_OPS_ON_CPU=1``: the custom ops with their torch math, as the kernel path
    saves for backward)."""
    if _kernel_ok(x, weight) or (
        weight.dtype == x.dtype and use_fused_op(_OP, x, weight)
    ):
        return torch.ops.mmcap.rmsnorm_fwd(x, weight, eps)[0]
    return rmsnorm_ref(x, weight, eps)
