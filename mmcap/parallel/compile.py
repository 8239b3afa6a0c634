"""megatron-core under ``torch.compile``: what keeps its tensor-parallel linears in one graph.

megatron-core 0.16's ``RowParallelLinear`` passes ``tp_group=None`` to its linear functions,
whose group lookup (``get_tensor_model_parallel_group_if_none``) then issues a
DeprecationWarning on rank 0 at every call. Dynamo cannot trace ``warnings.warn`` and breaks
the graph there: twice per layer (attention output and MLP output projections) on rank 0 only.
:func:`compile_friendly_megatron` makes the lookup resolve the default group silently while
compiling (the same group it resolves eagerly); eager calls are unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["compile_friendly_megatron"]

_PATCHED = False


def compile_friendly_megatron() -> None:
    """Idempotent; affects only calls traced by ``torch.compile``."""
    global _PATCHED
    if _PATCHED:
        return
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core import parallel_state

    eager = layers.get_tensor_model_parallel_group_if_none

    def group_if_none(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.compiler.is_compiling():
            if is_expert:
                return parallel_state.get_expert_tensor_parallel_group(
                    check_initialized=check_initialized
                )
            return parallel_state.get_tensor_model_parallel_group(
                check_initialized=check_initialized
            )
        return eager(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = group_if_none
    _PATCHED = True
