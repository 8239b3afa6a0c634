"""Per-GPU memory estimate of a training layout (TP x PP x DP, micro-batch, recompute), for
picking layouts before a run. Nothing here is measured: it is an analytic model of what
mmcap's modules keep alive, to be checked against ``torch.cuda.max_memory_allocated``.

Static memory, from the parameters this rank holds (counted on the meta-built model, with
its ``requires_grad`` flags, :func:`stage_parameters`):

- weights: every parameter (frozen ones too) in ``params_dtype``;
- gradients: megatron-core DDP keeps one contiguous buffer for the TRAINABLE parameters,
  float32 with ``grad_reduce_in_fp32`` (frozen parameters are not in it);
- optimizer: the distributed optimizer (ZeRO-1) shards fp32 main params + Adam exp_avg +
  exp_avg_sq = 12 bytes per trainable parameter over the DP group (8 with fp32 params, whose
  main copy is the parameter itself).

Activations: :mod:`mmcap.train.activations` (what each layer saves for backward, per
micro-batch).

Micro-batches in flight (megatron-core schedules): stage p of 1F1B holds min(PP - p, M);
interleaved (V chunks) stage p holds ((PP - p - 1) 2 + (V - 1) PP + 1) / V stage-equivalents
(Megatron-LM's 1 + (PP - 1) / (PP V) penalty on stage 0). Non-first stages keep each
in-flight micro-batch's received packed tensor, non-last stages its sent one
(``deallocate_pipeline_outputs=False``): 2 (s/TP_sp + k) b h_dec bytes each.

Transients (only the largest counts): the frozen DaViT's no-grad forward (~8 live copies of
its widest [b, tokens, C] map), the full-recompute working set (one layer), the bf16
weight gradient of the largest trainable tensor before it is added to the fp32 buffer, and
the fused head's logits tile of one token chunk and its dlogits, or its dW cast in backward
(last stage). The fused head's float32 dh and dW, held from forward to backward by its default
forward-gradient strategy, are the "logits" part.
The optimizer step runs after backward has freed the activations. The estimate assumes
torch's fused AdamW (``optim.implementation`` default; TE's / apex's FusedAdam alike), which
allocates nothing there; ``foreach`` allocates a float32 ``sqrt(exp_avg_sq)`` of the shard
(4 bytes x trainable / DP: 9.4 GiB for the 11.2B model at DP=1, more than its micro-batch-1
activations), not modelled.
Not modelled (keep headroom): the CUDA context (~0.5 GiB), NCCL buffers, allocator
fragmentation, data-loader pinned memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mmcap.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from mmcap.config.parallel import validate_layout
from mmcap.model.stage_io import packed_rows
from mmcap.model.pipeline import decoder_layer_range
from mmcap.ops.softcap_ce import VOCAB_CHUNK
from mmcap.ops.softcap_ce_fwdgrad import forward_grad_token_chunk
from mmcap.train.activations import (
    ACT,
    MicroBatchShape,
    vision_forward_bytes,
    bart_layer_bytes,
    gemma_layer_bytes,
)

GIB = 1024**3
# H100 SXM 80GB: 81,559 MiB as nvidia-smi reports it.
H100_80GB_BYTES = 81559 * 1024**2
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class StageParameters:
    """Parameters of one TP rank of a pipeline stage (all TP ranks of a stage hold the same).

    Args:
        trainable / frozen: local element counts by ``requires_grad``.
        largest_trainable: elements of the largest local trainable tensor (its bf16 weight
            gradient is a transient before megatron-core adds it to the fp32 buffer).
    """

    trainable: int = 0
    frozen: int = 0
    largest_trainable: int = 0


_PARAM_TABLES: dict[str, list[tuple[str, int, bool, bool]]] = {}


def _param_table(model: ModelConfig) -> list[tuple[str, int, bool, bool]]:
    """(name, numel, TP-split, trainable) of the TP=PP=1 meta model, cached per config."""
    from mmcap.config.serialize import model_config_to_dict

    plain = model_config_to_dict(model)
    plain["vision"].pop("image_size")  # no parameter depends on it: share 224 / 768 px
    key = json.dumps(plain, sort_keys=True)
    if key not in _PARAM_TABLES:
        from mmcap.model.build import build_model

        local = PrecisionConfig("bf16", transformer_impl="local")  # same sizes as TE
        built = build_model(model, ParallelConfig(), local, meta=True)
        _PARAM_TABLES[key] = [
            (n, p.numel(), bool(getattr(p, "tensor_model_parallel", False)), p.requires_grad)
            for n, p in built.named_parameters()
        ]
    return _PARAM_TABLES[key]


def stage_parameters(model: ModelConfig, parallel: ParallelConfig) -> list[StageParameters]:
    """Per pipeline stage, the parameters of one of its TP ranks, split by ``requires_grad``.

    Counted on the model built on the meta device at TP=PP=1 (megatron-core's groups must be
    initialised at TP=PP=1, as for :func:`mmcap.model.size.count_parameters`, whose per-rank
    rule this follows): TP-split tensors hold 1/TP of their elements (vocabularies after TP
    padding); stage 0 holds vision, encoder and decoder embedding; decoder layers go to the
    stage of their (virtual) chunk; the last stage holds the final norm and, with PP > 1, its
    copy of the tied LM head.
    """
    validate_layout(model, parallel)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    vpp = parallel.virtual_pipeline_parallel or 1
    stage_of_layer = {}
    for s in range(pp):
        for v in range(vpp):
            for i in range(*decoder_layer_range(model.decoder.num_layers, s, pp, v, vpp)):
                stage_of_layer[i] = s
    stages = [StageParameters() for _ in range(pp)]

    def add(stage: int, n: float, trainable: bool) -> None:
        n = round(n)
        st = stages[stage]
        if trainable:
            st.trainable += n
            st.largest_trainable = max(st.largest_trainable, n)
        else:
            st.frozen += n

    for name, numel, split, trainable in _param_table(model):
        local = numel / tp if split else float(numel)
        if name == "decoder.embedding.word_embeddings.weight":
            local = model.decoder.padded_vocab_size(tp) * model.decoder.hidden_size / tp
            if pp > 1 and model.decoder.tie_word_embeddings:
                add(pp - 1, local, trainable)  # the last stage's LM-head copy
        elif name == "encoder.embedding.word_embeddings.weight":
            local = model.encoder.embedding_rows(tp) * model.encoder.hidden_size / tp
        if name.startswith("decoder.layers."):
            stage = stage_of_layer[int(name.split(".")[2])]
        elif name.startswith(("decoder.final_layernorm", "decoder.output_layer")):
            stage = pp - 1
        else:
            stage = 0
        add(stage, local, trainable)
    return stages


def _in_flight(stage: int, pp: int, vpp: int, num_microbatches: int | None) -> float:
    if pp == 1:
        return 1.0
    if vpp > 1:
        n = ((pp - stage - 1) * 2 + (vpp - 1) * pp + 1) / vpp
    else:
        n = float(pp - stage)
    return min(n, num_microbatches) if num_microbatches else n


def estimate_memory(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    micro_batch_size: int,
    prompt_tokens: int = 128,
    target_tokens: int = 128,
    recompute: str | None = None,
    params_dtype: str = "bf16",
    num_microbatches: int | None = None,
    grad_reduce_in_fp32: bool = True,
    attention: str = "flash",
) -> dict:
    """Estimated peak bytes per GPU for each pipeline stage (module docstring: the model).

    Args:
        model_cfg: the model (preset + overrides; ``vision.image_size`` sets the image tokens).
        parallel: the layout; ``data_parallel`` must be set (it divides the optimizer state).
        micro_batch_size: samples per forward.
        prompt_tokens / target_tokens: padded encoder-prompt / decoder lengths (paper: 128).
        recompute: None, "selective" or "full" (``TrainConfig.recompute``).
        params_dtype: "bf16", "fp16" or "fp32".
        num_microbatches: micro-batches per step and DP rank (caps those in flight); None =
            at least PP.
        grad_reduce_in_fp32: fp32 gradient buffer (megatron-core DDP).
        attention: "flash" (any memory-efficient kernel: flash / TE / flex) or "math".

    Returns:
        {"layout", "tokens", "stages": [{"stage", "in_flight", "params", "bytes": {component:
        bytes}, "total"}], "peak_bytes", "peak_stage"} (JSON-serialisable).
    """
    if parallel.data_parallel is None:
        raise ConfigError("ParallelConfig.data_parallel: set it (it divides optimizer state)")
    if recompute not in (None, "selective", "full"):
        raise ConfigError(f"recompute: must be None, selective or full, got {recompute!r}")
    if attention not in ("flash", "math"):
        raise ConfigError(f"attention: must be 'flash' or 'math', got {attention!r}")
    if params_dtype not in DTYPE_BYTES:
        raise ConfigError(f"params_dtype: must be one of {sorted(DTYPE_BYTES)}")
    tp, pp, dp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.data_parallel
    vpp = parallel.virtual_pipeline_parallel or 1
    enc, dec, m = model_cfg.encoder, model_cfg.decoder, micro_batch_size
    n_img = model_cfg.vision.num_image_tokens
    sh = MicroBatchShape(m, target_tokens, n_img + prompt_tokens, tp, parallel.sequence_parallel)
    dec_trains = model_cfg.trainable.decoder_policy(dec.arch) == "all"

    def encoder_layer(rc: str | None) -> float:
        return bart_layer_bytes(
            enc,
            model_cfg.trainable.encoder,
            sh,
            sh.se,
            cross=False,
            recompute=rc,
            attention=attention,
        )

    def decoder_layer(rc: str | None) -> float:
        if dec.arch == "gemma2":
            return gemma_layer_bytes(model_cfg, sh, recompute=rc, attention=attention)
        return bart_layer_bytes(
            dec, dec_trains, sh, sh.s, cross=True, recompute=rc, attention=attention
        )

    enc_layer, dec_layer = encoder_layer(recompute), decoder_layer(recompute)
    # Full recompute rebuilds one layer at a time in backward.
    working = max(encoder_layer(None), decoder_layer(None)) if recompute == "full" else 0.0
    # Fused LM head + soft-capped CE (mmcap.ops.softcap_ce), the default forward-gradient
    # strategy: saves fp32 dh [tokens, h] (the whole sequence on every TP rank: sequence
    # parallelism gathers it) and fp32 dW [V_local, h] (the tied head always trains) and the
    # ignore mask, no logits, no inputs; works on one fp32 logits tile of a token chunk over the
    # shard plus its dlogits; backward casts dW into the weight's dtype in 32,768-row blocks.
    # (MMCAP_SOFTCAP_CE_GRAD=recompute saves h, labels, lse and the mask instead.)
    tokens = sh.s * m
    v_local = dec.padded_vocab_size(tp) // tp
    n_valid = min(v_local, dec.vocab_size)  # rank 0's real rows (the largest)
    head_saved = tokens * (4 * dec.hidden_size + 1) + 4 * n_valid * dec.hidden_size
    tile_t = min(tokens, forward_grad_token_chunk(n_valid))
    head_tile = max(
        tile_t * n_valid * (4 + ACT) + 4 * tile_t * dec.hidden_size,  # forward, per chunk
        v_local * dec.hidden_size * DTYPE_BYTES[params_dtype]  # backward: dW out
        + 4 * min(n_valid, VOCAB_CHUNK) * dec.hidden_size + ACT * tokens * dec.hidden_size,
    )
    k_rows = packed_rows(sh.se, enc.hidden_size, dec.hidden_size)
    packed = ACT * (sh.s / (tp if sh.sp else 1) + k_rows) * m * dec.hidden_size
    wbytes = DTYPE_BYTES[params_dtype]
    gbytes = 4 if grad_reduce_in_fp32 else wbytes
    obytes = 8 if params_dtype == "fp32" else 12
    stages = []
    for p, params in enumerate(stage_parameters(model_cfg, parallel)):
        first, last = p == 0, p == pp - 1
        layers = dec.num_layers // pp
        flight = _in_flight(p, pp, vpp, num_microbatches)
        per_mb = layers * dec_layer + ACT * sh.se * m * enc.hidden_size  # + encoder output
        if dec.arch == "gemma2":  # the stage's RoPE cos / sin tables, shared by its layers
            per_mb += 2 * ACT * sh.s * m * dec.head_dim
        if first:
            emb = (ACT + (enc.dropout > 0)) * enc.hidden_size  # LN input + dropout mask
            per_mb += enc.num_layers * enc_layer + sh.rows(sh.se, emb, 0)
            if dec.arch == "bart":
                per_mb += sh.rows(sh.s, (ACT + (dec.dropout > 0)) * dec.hidden_size, 0)
        if last:
            # Gemma final RMSNorm (fused: bf16 input + fp32 rstd per token); BART has none.
            norm = 0 if dec.arch == "bart" else ACT * dec.hidden_size + 4
            per_mb += sh.rows(sh.s, norm, 0)
        transient = max(
            vision_forward_bytes(model_cfg, m) if first else 0.0,
            working,
            ACT * params.largest_trainable,
            head_tile if last else 0.0,
        )
        parts = {
            "weights": (params.trainable + params.frozen) * wbytes,
            "grads": params.trainable * gbytes,
            "optimizer": params.trainable * obytes / dp,
            "activations": flight * per_mb,
            "pipeline": flight * packed * ((not first) + (not last)),
            "logits": head_saved if last else 0.0,
            "transient": transient,
        }
        parts = {k: math.ceil(v) for k, v in parts.items()}
        stages.append(
            {
                "stage": p,
                "in_flight": flight,
                "params": {"trainable": params.trainable, "frozen": params.frozen},
                "bytes": parts,
                "total": sum(parts.values()),
            }
        )
    peak = max(stages, key=lambda st: st["total"])
    return {
        "preset": model_cfg.name,
        "layout": {
            "tensor_parallel": tp,
            "pipeline_parallel": pp,
            "virtual_pipeline_parallel": parallel.virtual_pipeline_parallel,
            "sequence_parallel": parallel.sequence_parallel,
            "data_parallel": dp,
        },
        "micro_batch_size": m,
        "num_microbatches": num_microbatches,
        "recompute": recompute,
        "params_dtype": params_dtype,
        "attention": attention,
        "tokens": {"image": n_img, "encoder": sh.se, "decoder": sh.s},
        "stages": stages,
        "peak_bytes": peak["total"],
        "peak_stage": peak["stage"],
    }


def search_layouts(
    model_cfg: ModelConfig,
    world_size: int,
    global_batch_size: int,
    *,
    budget_bytes: float,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    max_tensor_parallel: int = 8,
    **kwargs,
) -> list[dict]:
    """Layouts of ``world_size`` GPUs whose estimated peak fits ``budget_bytes``, best first.

    For each valid (TP, PP) (SP on whenever TP > 1, no interleaving) and micro-batch size
    dividing the global batch, the least recompute that fits is kept. Order: fewest
    model-parallel ranks (TP x PP: least communication), then least recompute, then the
    largest micro-batch. ``kwargs`` go to :func:`estimate_memory`.
    """
    order = {None: 0, "selective": 1, "full": 2}
    found = []
    for tp in (d for d in range(1, max_tensor_parallel + 1) if world_size % d == 0):
        for pp in (d for d in range(1, world_size // tp + 1) if (world_size // tp) % d == 0):
            dp = world_size // (tp * pp)
            parallel = ParallelConfig(
                tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=tp > 1, data_parallel=dp
            )
            try:
                validate_layout(model_cfg, parallel)
            except ConfigError:
                continue
            for mbs in micro_batch_sizes:
                num_mb, rest = divmod(global_batch_size, mbs * dp)
                if rest or num_mb < pp:
                    continue
                for rc in order:
                    est = estimate_memory(
                        model_cfg,
                        parallel,
                        micro_batch_size=mbs,
                        recompute=rc,
                        num_microbatches=num_mb,
                        **kwargs,
                    )
                    if est["peak_bytes"] <= budget_bytes:
                        found.append(
                            {
                                **est["layout"],
                                "micro_batch_size": mbs,
                                "num_microbatches": num_mb,
                                "recompute": rc,
                                "peak_bytes": est["peak_bytes"],
                            }
                        )
                        break
    found.sort(
        key=lambda r: (
            r["tensor_parallel"] * r["pipeline_parallel"],
            order[r["recompute"]],
            -r["micro_batch_size"],
        )
    )
    return found
