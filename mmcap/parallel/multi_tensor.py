"""Sync-free torch fallbacks for megatron-core's multi-tensor ops when neither apex nor
Transformer Engine is installed (the CPU machine, and a bare GPU machine with plain torch).

megatron-core 0.16.1's own fallbacks (``megatron.core.utils``) loop in Python:

- ``local_multi_tensor_l2_norm`` (the global gradient norm of ``clip_grad_norm``) takes one
  ``torch.norm`` per gradient and then builds ``torch.tensor([...])`` from those device
  scalars, which reads each of them on the host: on CUDA one host sync per gradient tensor
  (hundreds per step for the Gemma sizes), plus one more ``float()`` of the total;
- ``local_multi_tensor_scale`` (main -> model parameter copies, gradient clipping) launches a
  multiply and a copy per tensor.

:func:`foreach_l2_norm` and :func:`foreach_scale` are drop-in replacements (apex's
``amp_C.multi_tensor_l2norm`` / ``multi_tensor_scale`` signatures) built on torch's
``_foreach`` kernels: a handful of launches for all tensors and no host read; megatron-core then
reads the reduced norm once. :func:`install_multi_tensor_fallbacks` swaps them into the
megatron-core modules that picked the local fallbacks, and leaves apex's / TE's kernels alone.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["foreach_l2_norm", "foreach_scale", "install_multi_tensor_fallbacks"]

logger = logging.getLogger(__name__)


def _group_by_device_dtype(tensors) -> dict:
    """{(device, dtype): positions in ``tensors``}."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _float_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms in float32 (accumulated in float32 for low-precision inputs)."""
    try:
        return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    except (TypeError, RuntimeError):  # a torch without the dtype argument
        return [n.float() for n in torch._foreach_norm(tensors, 2.0)]


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm`` on torch ``_foreach_norm``: the 2-norm of all tensors of
    ``tensor_lists[0]`` together, as a float32 tensor of shape [1] on their device, and (with
    ``per_tensor``) each tensor's norm; no host synchronisation.

    Args:
        chunk_size, noop_flag: apex's arguments, unused.
        tensor_lists: ``[tensors]``.
        per_tensor: also return the per-tensor norms (else None).
    """
    tensors = list(tensor_lists[0])
    if not tensors:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        zero = torch.zeros(1, dtype=torch.float32, device=device)
        return zero, (zero.new_zeros(0) if per_tensor else None)
    first = tensors[0].device
    norms: list = [None] * len(tensors)
    for positions in _group_by_device_dtype(tensors).values():
        for i, n in zip(positions, _float_norms([tensors[i] for i in positions])):
            norms[i] = n.to(first, non_blocking=True)
    ordered = torch.stack(norms)
    total = torch.linalg.vector_norm(ordered).reshape(1)
    return total, (ordered if per_tensor else None)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale`` on torch ``_foreach`` ops: ``dst = src * scale`` for the
    pairs of ``tensor_lists = [src, dst]`` (dtype converted as ``copy_``); in place when ``dst``
    is ``src``; no host synchronisation.

    Args:
        chunk_size, noop_flag: apex's arguments, unused (like megatron-core's own fallback,
            this does not flag non-finite values).
        tensor_lists: ``[src, dst]``, equal lengths.
        scale: a Python number.
    """
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if len(src) != len(dst):
        raise ValueError(f"multi_tensor_scale: {len(src)} sources for {len(dst)} destinations")
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        if scale != 1.0:
            torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


def install_multi_tensor_fallbacks() -> bool:
    """Replace megatron-core's Python-loop fallbacks with :func:`foreach_l2_norm` /
    :func:`foreach_scale` in the modules that selected them (``optimizer.clip_grads`` and
    ``optimizer.optimizer``); idempotent.

    Returns:
        True when something was (or already is) replaced, False when apex / Transformer Engine
        kernels are in use (nothing to do).
    """
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer

    local_norm = mcore_utils.local_multi_tensor_l2_norm
    local_scale = mcore_utils.local_multi_tensor_scale
    replaced = False
    for mod in (clip_grads, optimizer):
        if getattr(mod, "l2_norm_impl", None) in (local_norm, foreach_l2_norm):
            mod.l2_norm_impl = foreach_l2_norm
            replaced = True
        if getattr(mod, "multi_tensor_scale_impl", None) in (local_scale, foreach_scale):
            mod.multi_tensor_scale_impl = foreach_scale
            replaced = True
    if replaced:
        logger.info("megatron-core multi-tensor fallbacks: torch _foreach (no apex / TE)")
    return replaced
