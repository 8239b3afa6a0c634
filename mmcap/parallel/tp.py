"""Moving whole (TP-independent) tensors in and out of tensor-parallel modules.

megatron-core marks every tensor-parallel parameter with ``tensor_model_parallel``,
``partition_dim`` and ``partition_stride``. A full tensor is split along ``partition_dim`` into
``stride x TP`` equal chunks and rank r holds chunks r, r + TP, ... (stride 2 = a fused
[gate ; up] GLU weight; megatron-core's ``_initialize_affine_weight_cpu`` uses the same rule).
These helpers apply that rule both ways, so checkpoint conversion and the TP tests share one
definition of "the full tensor".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def _tp_rank_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_for_rank(
    param: torch.Tensor, full: torch.Tensor, rank: int | None = None, world: int | None = None
) -> torch.Tensor:
    """This TP rank's piece of ``full`` for ``param`` (the full tensor itself if replicated)."""
    if not is_tp_sharded(param):
        return full
    if rank is None or world is None:
        rank, world = _tp_rank_size()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def gather_full(param: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_for_rank`: all-gather ``local`` (default the param) over TP."""
    local = param.detach() if local is None else local.detach()
    if not is_tp_sharded(param):
        return local.clone()
    rank, world = _tp_rank_size()
    if world == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(
        parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    # Each rank holds `stride` chunks; reorder to chunk order r, r+TP, ... -> 0, 1, 2, ...
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    ordered = [per_rank[r][j] for j in range(stride) for r in range(world)]
    return torch.cat(ordered, dim=dim)


def load_full_state_dict(
    module: nn.Module, full: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy TP-independent tensors ``full`` (name -> tensor) into ``module``'s local shards.

    Raises:
        KeyError / ValueError naming the parameter on missing keys or a shape mismatch.
    """
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    with torch.no_grad():
        for name, p in params.items():
            if name not in full:
                continue
            piece = shard_for_rank(p, full[name])
            if piece.shape != p.shape:
                raise ValueError(
                    f"{name}: full tensor {tuple(full[name].shape)} gives a TP shard "
                    f"{tuple(piece.shape)}, the model expects {tuple(p.shape)}"
                )
            p.copy_(piece.to(p.dtype))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` as its full TP-independent tensor (collective over TP)."""
    return {n: gather_full(p) for n, p in module.named_parameters()}


def full_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, gathered to its full shape (collective over TP)."""
    return {n: gather_full(p, p.grad) for n, p in module.named_parameters() if p.grad is not None}


def allreduce_sequence_parallel_grads(module: nn.Module) -> None:
    """Sum the partial gradients of parameters used on sequence shards (norm weights, gates)
    over the TP group, as megatron-core's ``finalize_model_grads`` does for ``sequence_parallel``
    parameters."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
