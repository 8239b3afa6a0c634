"""Parameter counts of a decoder built on the meta device (no memory), by component and by
TP/PP rank.

Per-rank counts are derived from the TP=1 meta model with megatron-core's partition
attributes: a tensor-parallel parameter holds 1/TP of its elements on each rank, a replicated
one all of them; a pipeline stage holds its layer range, the first stage the embedding, the
last stage the final norm (and, with PP > 1, its copy of the tied embedding).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from mmcap.config import DecoderConfig, ParallelConfig, PrecisionConfig
from mmcap.model.pipeline import decoder_layer_range

# Component of a parameter, from its name (first match wins).
_COMPONENTS = (
    ("cross_attention.", "cross_attention"),
    ("self_attention.", "self_attention"),
    ("mlp.", "mlp"),
    ("layernorm", "norms"),
    ("embedding.", "embedding"),
)


@dataclass
class DecoderSize:
    total: int
    by_component: dict[str, int]
    per_layer: int
    per_rank: dict[tuple[int, int], int] = field(default_factory=dict)  # (pp, tp) -> params


def _component(name: str) -> str:
    for key, comp in _COMPONENTS:
        if key in name:
            return comp
    return "other"


def count_decoder_parameters(
    decoder: DecoderConfig, parallel: ParallelConfig | None = None
) -> DecoderSize:
    """Build ``decoder`` on meta at TP=PP=1 and count; per-rank numbers for ``parallel``.

    megatron-core's parallel_state must be initialised at TP=PP=1 (a world of one is enough).
    """
    from mmcap.model.build import build_gemma2_decoder

    parallel = parallel or ParallelConfig()
    model = build_gemma2_decoder(decoder, ParallelConfig(), PrecisionConfig("bf16"), meta=True)
    by_comp: dict[str, int] = defaultdict(int)
    layer_params: dict[int, int] = defaultdict(int)
    layer_tp_params: dict[int, float] = defaultdict(float)
    emb_tp = final = 0
    tp = parallel.tensor_parallel
    for name, p in model.named_parameters():
        n = p.numel()
        by_comp[_component(name)] += n
        local = n / tp if getattr(p, "tensor_model_parallel", False) else n
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            layer_params[i] += n
            layer_tp_params[i] += local
        elif name.startswith("embedding."):
            emb_tp = local
        else:
            final += n  # final norm: replicated
    total = sum(by_comp.values())
    padded = decoder.padded_vocab_size(tp)
    emb_tp = emb_tp * padded / decoder.padded_vocab_size(1)
    per_rank = {}
    pp = parallel.pipeline_parallel
    for s in range(pp):
        start, end = decoder_layer_range(decoder.num_layers, s, pp)
        count = sum(layer_tp_params[i] for i in range(start, end))
        if s == 0:
            count += emb_tp
        if s == pp - 1:
            count += final + (emb_tp if pp > 1 else 0)
        for r in range(tp):
            per_rank[(s, r)] = int(round(count))
    return DecoderSize(total, dict(by_comp), layer_params[0], per_rank)
