"""mmcap's megatron-core ``TransformerConfig``: one config object per stack holding every
shape and numeric fact its layers read.

:class:`MMCapTransformerConfig` subclasses megatron-core's ``TransformerConfig`` (as
Megatron-Bridge's Gemma-2 provider does) with the fields megatron-core has no slot for:
Gemma-2's logit soft-caps, per-layer sliding windows (HF's ``layer_types``), activation and
activation dropout, the encoder width read by cross-attention and the initialisation of the
attention projections. Megatron-core's own fields carry the rest (``softmax_scale`` =
``query_pre_attn_scalar ** -0.5``, ``layernorm_zero_centered_gamma`` for Gemma's
RMSNorm(1 + w), ``transformer_impl``, the ``fp8*`` recipe fields). The layers are built from
``ModuleSpec``s (:mod:`mmcap.model.specs`) and take nothing but this config, their submodule
specs and their layer index.

Activation recompute (``recompute=None|"selective"|"full"``) is stored in megatron-core's own
fields (``recompute_granularity``, ``recompute_method``, ``recompute_num_layers``), which
mmcap's layers read (:mod:`mmcap.model.attention`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import ConfigError, DecoderConfig, EncoderConfig, ParallelConfig, PrecisionConfig
from mmcap.model.te import resolve_transformer_impl

RECOMPUTE_CHOICES = (None, "selective", "full")


@dataclass
class MMCapTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the Gemma-2 / BART fields mmcap's layers read.

    Args:
        arch: "gemma2" (pre/post sandwich RMSNorm(1 + w), GeGLU, RoPE, gated cross-attention)
            or "bart" (post-LN, biases, plain MLP, learned positions).
        attn_logit_softcap: tanh soft-cap of the self- and cross-attention logits (None = off).
        final_logit_softcap: tanh soft-cap of the LM-head logits (None = off).
        sliding_window: window of the sliding layers (HF semantics), None = no window.
        layer_types: per global layer "sliding_attention" / "full_attention" (HF numbering);
            None = every layer is full attention.
        activation: "gelu_tanh" (Gemma-2, GeGLU) or "gelu" (BART, exact erf).
        activation_dropout: dropout after the FFN activation (BART), training only.
        encoder_hidden_size: width of the encoder output cross-attention reads (None = the
            stack has no cross-attention).
        gated_cross_attention: Gemma-2 layers carry the gated cross-attention block.
        attention_init_std: std of N(0, std) for every attention projection including the
            output (BART); None = megatron-core's ``init_method`` / scaled
            ``output_layer_init_method`` (Gemma-2 self-attention).
        cross_attention_init_std: the same for the cross-attention projections.
    """

    arch: str = "gemma2"
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    activation: str = "gelu_tanh"
    activation_dropout: float = 0.0
    encoder_hidden_size: int | None = None
    gated_cross_attention: bool = False
    attention_init_std: float | None = None
    cross_attention_init_std: float | None = None

    def window(self, layer_idx: int) -> int | None:
        """Sliding window of global layer ``layer_idx`` (None = full attention)."""
        if self.layer_types is None or self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window


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


def _fp8_fields(precision: PrecisionConfig) -> dict:
    """megatron-core's FP8 fields (read by ``get_fp8_context``) for ``precision.fp8``."""
    if precision.fp8 is None:
        return {}
    return {
        "fp8": precision.fp8,
        "fp8_recipe": precision.fp8_recipe,
        "fp8_amax_history_len": precision.fp8_amax_history_len,
        # Megatron-LM's FP8 recipes pair a long history with its maximum.
        "fp8_amax_compute_algo": "max" if precision.fp8_amax_history_len > 1 else "most_recent",
    }


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
    **mmcap_fields,
) -> MMCapTransformerConfig:
    parallel = parallel or ParallelConfig()
    precision = precision or PrecisionConfig(params_dtype="fp32")
    dtype = precision.torch_dtype
    impl = resolve_transformer_impl(precision)
    if precision.fp8 is not None and recompute == "full":
        raise ConfigError(
            "recompute: full recompute re-runs the layers outside Transformer Engine's FP8 "
            "autocast; with precision.fp8 use recompute=selective or none"
        )
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
        transformer_impl=impl,
        **_fp8_fields(precision),
        **_recompute_fields(recompute),
        **mmcap_fields,
    )
    with warnings.catch_warnings():
        # "selective" warns that Transformer Engine's core attention may be fused already;
        # mmcap's core attention is its own back-end call (mmcap.ops.attention), not TE's.
        warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        return MMCapTransformerConfig(**fields)


def build_decoder_transformer_config(
    decoder: DecoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    recompute: str | None = None,
) -> MMCapTransformerConfig:
    """The config of ``decoder``'s layers (Gemma-2 or BART) under ``parallel`` / ``precision``.

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
        arch=decoder.arch,
        # Gemma's q.k scale is query_pre_attn_scalar ** -0.5; BART's head_dim ** -0.5 is
        # megatron-core's default (softmax_scale None).
        softmax_scale=decoder.query_pre_attn_scalar**-0.5 if gemma else None,
        layernorm_zero_centered_gamma=gemma,  # RMSNorm(1 + w)
        attn_logit_softcap=decoder.attn_logit_softcap if gemma else None,
        final_logit_softcap=decoder.final_logit_softcap,
        sliding_window=decoder.sliding_window if gemma else None,
        layer_types=tuple(decoder.resolved_layer_types) if gemma else None,
        activation=decoder.activation,
        activation_dropout=decoder.activation_dropout,
        encoder_hidden_size=decoder.encoder_hidden_size,
        gated_cross_attention=gemma and decoder.gated_cross_attention,
        attention_init_std=None if gemma else decoder.init_std,
        cross_attention_init_std=decoder.xattn_init_std if gemma else decoder.init_std,
    )


def build_encoder_transformer_config(
    encoder: EncoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    recompute: str | None = None,
) -> MMCapTransformerConfig:
    """The config of the BART encoder's layers. The encoder never uses sequence parallelism:
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
        arch="bart",
        activation=encoder.activation,
        activation_dropout=encoder.activation_dropout,
        attention_init_std=encoder.init_std,
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
