"""Parameter counts of a whole model built on the meta device (no memory): total, trainable,
by component, and per TP/PP rank.

Per-rank counts are derived from the TP=1 meta model with megatron-core's partition
attributes: a tensor-parallel parameter holds 1/TP of its elements on each rank (vocabulary
tables after TP padding), a replicated one all of them. The first pipeline stage holds the
vision tower, the encoder and the decoder embedding; each stage its decoder layer range; the
last stage the final norm and, with PP > 1, its copy of the tied embedding (megatron-core
keeps the LM head there).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from mmcap.config import ModelConfig, ParallelConfig, PrecisionConfig
from mmcap.model.pipeline import decoder_layer_range

# Component of a decoder parameter, from its name (first match wins).
_DECODER_PARTS = (
    ("cross_attention.", "cross_attention"),
    ("self_attention.", "self_attention"),
    ("mlp.", "mlp"),
    ("embedding.", "embedding"),
    ("norm", "norms"),
)


@dataclass
class ModelSize:
    total: int
    trainable: int
    by_component: dict[str, int]
    per_rank: dict[tuple[int, int], int] = field(default_factory=dict)  # (pp, tp) -> params


def component(name: str) -> str:
    """ "vision", "encoder" or "decoder.<part>" for a CaptioningModel parameter name."""
    top = name.split(".", 1)[0]
    if top != "decoder":
        return top
    for key, part in _DECODER_PARTS:
        if key in name:
            return f"decoder.{part}"
    return "decoder.other"


def count_parameters(model: ModelConfig, parallel: ParallelConfig | None = None) -> ModelSize:
    """Build ``model`` on meta at TP=PP=1 and count; per-rank numbers for ``parallel``.

    megatron-core's parallel_state must be initialised at TP=PP=1 (a world of one is enough).
    """
    from mmcap.model.build import build_model

    parallel = parallel or ParallelConfig()
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    # Sizes do not depend on the implementation; local builds on the meta device anywhere.
    local = PrecisionConfig("bf16", transformer_impl="local")
    built = build_model(model, ParallelConfig(), local, meta=True)
    by_comp: dict[str, int] = defaultdict(int)
    stage_local: dict[int, float] = defaultdict(float)  # pp stage -> params per TP rank
    layers = {s: range(*decoder_layer_range(model.decoder.num_layers, s, pp)) for s in range(pp)}
    total = trainable = 0
    for name, p in built.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        by_comp[component(name)] += n
        local = n / tp if getattr(p, "tensor_model_parallel", False) else float(n)
        if name == "decoder.embedding.word_embeddings.weight":
            local = model.decoder.padded_vocab_size(tp) * model.decoder.hidden_size / tp
            if pp > 1:
                stage_local[pp - 1] += local  # the last stage's LM-head copy
        elif name == "encoder.embedding.word_embeddings.weight":
            local = model.encoder.embedding_rows(tp) * model.encoder.hidden_size / tp
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            stage = next(s for s, r in layers.items() if i in r)
        elif name.startswith("decoder.final_layernorm"):
            stage = pp - 1
        else:
            stage = 0
        stage_local[stage] += local
    per_rank = {(s, r): int(round(stage_local[s])) for s in range(pp) for r in range(tp)}
    return ModelSize(total, trainable, dict(sorted(by_comp.items())), per_rank)
