"""Which decoder layers a pipeline stage (and virtual-pipeline chunk) builds.

Megatron-LM's layout: with P stages and V virtual chunks per stage, the L layers form P x V
equal chunks assigned round-robin, so chunk v of stage p holds layers
``[(v * P + p) * L / (P V), (v * P + p + 1) * L / (P V))``; without interleaving (V = 1),
stage p holds ``[p L / P, (p + 1) L / P)``. Layer indices stay GLOBAL (HF numbering), which is
what decides a Gemma-2 layer's sliding window.
"""

from __future__ import annotations


def decoder_layer_range(
    num_layers: int,
    pp_rank: int,
    pp_size: int,
    vp_stage: int | None = None,
    vp_size: int | None = None,
) -> tuple[int, int]:
    """[start, end) of the global layer indices built by stage ``pp_rank`` / chunk ``vp_stage``."""
    vp_size = vp_size or 1
    vp_stage = vp_stage or 0
    chunks = pp_size * vp_size
    if num_layers % chunks:
        raise ValueError(
            f"num_layers {num_layers} is not divisible by pipeline_parallel x "
            f"virtual_pipeline_parallel = {chunks}"
        )
    if not (0 <= pp_rank < pp_size and 0 <= vp_stage < vp_size):
        raise ValueError(f"stage {pp_rank}/{pp_size}, chunk {vp_stage}/{vp_size} out of range")
    per_chunk = num_layers // chunks
    start = (vp_stage * pp_size + pp_rank) * per_chunk
    return start, start + per_chunk
