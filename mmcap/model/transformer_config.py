"""Bridge from mmcap's typed configs to megatron-core's ``TransformerConfig``.

megatron-core's tensor-parallel layers, embeddings and schedules all read a TransformerConfig;
mmcap builds exactly one per decoder from its own dataclasses (the single source of truth) and
attaches the fields megatron-core has no slot for (soft-caps, sandwich norms, windows) on the
mmcap side.

Activation recompute (``recompute=None|"selective"|"full"``) is stored in megatron-core's own
fields (``recompute_granularity``, ``recompute_method``, ``recompute_num_layers``), which
mmcap's layers read (:mod:`mmcap.model.attention`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import ConfigError, DecoderConfig, EncoderConfig, ParallelConfig, PrecisionConfig

RECOMPUTE_CHOICES = (None, "selective", "full")


def _recompute_fields(recompute: str | None) -> dict:
    """megatron-core's recompute fields for mmcap's ``recompute`` switch.

    "full": every layer is recomputed on its own (Megatron-LM's ``--recompute-method uniform
    --recompute-num-layers 1``); "selective": the core attention of every layer
    (``recompute_modules=["core_attn"]``, megatron-core's default for "selective").
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise ConfigError(f"recompute: must be None, 'selective' or 'full', got {recompute!r}")
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}


def _transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    init_std: float,
    norm: str,
    norm_eps: float,
    gated: bool,
    bias: bool,
    dropout: float,
    attention_dropout: float,
    parallel: ParallelConfig | None,
    precision: PrecisionConfig | None,
    sequence_parallel: bool | None = None,
    recompute: str | None = None,
) -> TransformerConfig:
    parallel = parallel or ParallelConfig()
    precision = precision or PrecisionConfig(params_dtype="fp32")
    dtype = precision.torch_dtype
    vpp = parallel.virtual_pipeline_parallel
    sp = parallel.sequence_parallel if sequence_parallel is None else sequence_parallel
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_heads,
        num_query_groups=num_kv_heads,
        kv_channels=head_dim,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=sp and parallel.tensor_parallel > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Weights are created on the CPU (or meta) and, with TP, sliced from one full
        # master tensor: the same seed gives the same model for every TP size.
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=init_std,
        normalization=norm,
        layernorm_epsilon=norm_eps,
        gated_linear_unit=gated,
        add_bias_linear=bias,
        hidden_dropout=dropout,
        attention_dropout=attention_dropout,
        gradient_accumulation_fusion=False,
        # Softmax in fp32 inside the attention back-ends; megatron's own fused softmax unused.
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=False,
        batch_p2p_sync=torch.cuda.is_available(),
        # PP=2 interleaved: a stage's previous and next stage are the same rank, and batched
        # p2p posts both directions on one group, so the receiver pairs a gradient with an
        # activation of the same shape (messages between two ranks match in posting order;
        # measured on gloo). Unbatched p2p (megatron-core's _p2p_ops) puts the two directions
        # on two groups (pipeline group and WORLD) when the pipeline group has 2 ranks.
        batch_p2p_comm=not (parallel.pipeline_parallel == 2 and bool(vpp) and vpp > 1),
        **_recompute_fields(recompute),
    )
    with warnings.catch_warnings():
        # "selective" warns that Transformer Engine's core attention may be fused already;
        # mmcap's core attention is its own back-end call (mmcap.ops.attention), not TE's.
        warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        return TransformerConfig(**fields)


def build_decoder_transformer_config(
    decoder: DecoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    recompute: str | None = None,
) -> TransformerConfig:
    """TransformerConfig for ``decoder`` (Gemma-2 or BART) under ``parallel`` / ``precision``.

    Args:
        recompute: activation recompute of the decoder layers: None, "selective" (the core
            attention of every self- and cross-attention) or "full" (every layer).
    """
    gemma = decoder.arch == "gemma2"
    return _transformer_config(
        num_layers=decoder.num_layers,
        hidden_size=decoder.hidden_size,
        ffn_hidden_size=decoder.ffn_hidden_size,
        num_heads=decoder.num_attention_heads,
        num_kv_heads=decoder.num_kv_heads,
        head_dim=decoder.head_dim,
        init_std=decoder.init_std,
        norm="RMSNorm" if gemma else "LayerNorm",
        norm_eps=decoder.norm_eps,
        gated=gemma,
        bias=not gemma,
        dropout=decoder.dropout,
        attention_dropout=decoder.attention_dropout,
        parallel=parallel,
        precision=precision,
        recompute=recompute,
    )


def build_encoder_transformer_config(
    encoder: EncoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    recompute: str | None = None,
) -> TransformerConfig:
    """TransformerConfig for the BART encoder. The encoder never uses sequence parallelism:
    its output is consumed in full by every decoder layer on every TP rank.

    Args:
        recompute: as :func:`build_decoder_transformer_config`, for the encoder layers.
    """
    return _transformer_config(
        num_layers=encoder.num_layers,
        hidden_size=encoder.hidden_size,
        ffn_hidden_size=encoder.ffn_hidden_size,
        num_heads=encoder.num_attention_heads,
        num_kv_heads=encoder.num_attention_heads,
        head_dim=encoder.hidden_size // encoder.num_attention_heads,
        init_std=encoder.init_std,
        norm="LayerNorm",
        norm_eps=encoder.layer_norm_eps,
        gated=False,
        bias=True,
        dropout=encoder.dropout,
        attention_dropout=encoder.attention_dropout,
        parallel=parallel,
        precision=precision,
        sequence_parallel=False,
        recompute=recompute,
    )


def with_sequence_parallel(config: TransformerConfig, enabled: bool) -> TransformerConfig:
    """A shallow copy of ``config`` with ``sequence_parallel`` set (for layers that read a
    replicated, full-sequence input such as the encoder output). ``copy.copy``, not
    ``dataclasses.replace``: the fields were validated once, and re-running megatron-core's
    ``__post_init__`` would repeat its warnings."""
    if config.sequence_parallel == enabled:
        return config
    new = copy.copy(config)
    new.sequence_parallel = enabled
    return new
