"""GeGLU ``gelu_tanh(gate) * up`` on megatron's fused fc1 output.

Layout: ``linear_fc1`` is built with ``stride=2`` (mmcap/model/mlp.py), so each TP rank's
output row is ``[gate_r ; up_r]``: the first half of the last dim is the gate, the second the
up projection, and the op is local to the rank.

Three pieces (STYLE.md rule 5): ``csrc/geglu/`` (module ``mmcap_geglu_cuda``), the custom ops
``mmcap::geglu_fwd`` / ``mmcap::geglu_bwd`` (fake registrations, autograd; non-kernel
implementation = explicit float32 formulas), and :func:`geglu_ref`, the plain autograd
reference the model ran before (and runs on CPU or with ``MMCAP_DISABLE_KERNELS=1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcap.ops.kernels import load_extension, use_fused_op, use_kernel

__all__ = ["geglu", "geglu_ref"]

_OP = "geglu"
_BETA = math.sqrt(2.0 / math.pi)  # torch's gelu(approximate="tanh") constants
_KAPPA = 0.044715


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] = [gate ; up] -> gelu_tanh(gate) * up [..., f], plain PyTorch."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _kernel_ok(x: torch.Tensor) -> bool:
    return use_kernel(_OP, x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _gelu_and_grad(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(_BETA * (g + _KAPPA * g**3))
    grad = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _BETA * (1 + 3 * _KAPPA * g * g)
    return 0.5 * g * (1 + t), grad


def _check(x: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: last dim {x.shape[-1]} must be even ([gate ; up])")


@torch.library.custom_op("mmcap::geglu_fwd", mutates_args=())
def geglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] -> y [..., f] of x's dtype; float32 math."""
    _check(x)
    f = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * f).contiguous()
    if _kernel_ok(x):
        y = load_extension(_OP).forward(x2)
    else:
        gelu, _ = _gelu_and_grad(x2[:, :f].float())
        y = (gelu * x2[:, f:].float()).to(x.dtype)
    return y.view(*x.shape[:-1], f)


@geglu_fwd.register_fake
def _(x):
    _check(x)
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("mmcap::geglu_bwd", mutates_args=())
def geglu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy [..., f], x [..., 2f] -> dx [..., 2f] = [dy * up * gelu'(gate) ; dy * gelu(gate)]."""
    f = dy.shape[-1]
    x2, dy2 = x.reshape(-1, 2 * f).contiguous(), dy.reshape(-1, f).contiguous()
    if _kernel_ok(x):
        dx = load_extension(_OP).backward(dy2, x2)
    else:
        gelu, dgelu = _gelu_and_grad(x2[:, :f].float())
        d = dy2.float()
        dx = torch.cat([d * x2[:, f:].float() * dgelu, d * gelu], dim=-1).to(x.dtype)
    return dx.view(x.shape)


@geglu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.mmcap.geglu_bwd(dy.contiguous(), x)


geglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GeGLU on [gate ; up]: the CUDA kernel when usable (CUDA tensor, extension built,
    MMCAP_DISABLE_KERNELS unset), else :func:`geglu_ref` (``MMCAP_FUSED_OPS_ON_CPU=1``: the
    custom ops with their torch math, as the kernel path saves for backward)."""
    if _kernel_ok(x) or use_fused_op(_OP, x):
        return torch.ops.mmcap.geglu_fwd(x)
    return geglu_ref(x)
