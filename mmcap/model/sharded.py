"""megatron-core distributed-checkpoint support for mmcap's layer stacks.

megatron-core's default ``sharded_state_dict`` recursion treats a plain ``nn.ModuleList`` as
replicated, and a pipeline stage numbers its layers locally. :func:`stack_sharded_state_dict`
asks every layer for its own (TP-aware) sharded state dict and renames the checkpoint keys to
GLOBAL layer indices (``replace_prefix_for_sharding``, as megatron-core's TransformerBlock), so
a checkpoint saved with one TP/PP layout loads into any other. The dict keys stay local, so
``model.load_state_dict`` takes what ``dist_checkpointing.load`` returns.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    sharded_state_dict_default,
)
from torch import nn


def stack_sharded_state_dict(
    module: nn.Module, prefix: str, sharded_offsets, metadata, layer_offset: int
) -> dict:
    """Sharded state dict of ``module`` whose ``layers`` ModuleList starts at global index
    ``layer_offset``; every other child uses megatron-core's default."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    # Replicated tensors get replica ids from the TP rank; without the group every TP rank
    # would claim to hold the main replica.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out: dict = {}
    for name, child in module.named_children():
        if name != "layers":
            out.update(
                sharded_state_dict_default(
                    child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                )
            )
            continue
        for i, layer in enumerate(child):
            local = f"{prefix}layers.{i}."
            layer_sd = layer.sharded_state_dict(
                prefix=local, sharded_offsets=sharded_offsets, metadata=metadata
            )
            replace_prefix_for_sharding(layer_sd, local, f"{prefix}layers.{layer_offset + i}.")
            out.update(layer_sd)
    own = {n: p for n, p in module.named_parameters(recurse=False)}
    if own:
        raise ValueError(
            f"{type(module).__name__} owns parameters {sorted(own)} directly; give them a submodule"
        )
    return out
