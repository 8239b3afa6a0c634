"""Bridge from mmcap's typed configs to megatron-core's ``TransformerConfig``.

megatron-core's tensor-parallel layers, embeddings and schedules all read a TransformerConfig;
mmcap builds exactly one per decoder from its own dataclasses (the single source of truth) and
attaches the fields megatron-core has no slot for (soft-caps, sandwich norms, windows) on the
mmcap side.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig, ParallelConfig, PrecisionConfig


def build_decoder_transformer_config(
    decoder: DecoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    perform_initialization: bool = True,
) -> TransformerConfig:
    """TransformerConfig for ``decoder`` under ``parallel`` / ``precision``.

    Args:
        perform_initialization: False when building on the meta device or when weights are
            about to be loaded (skips the random init megatron-core would run).
    """
    parallel = parallel or ParallelConfig()
    precision = precision or PrecisionConfig(params_dtype="fp32")
    dtype = precision.torch_dtype
    vpp = parallel.virtual_pipeline_parallel
    return TransformerConfig(
        num_layers=decoder.num_layers,
        hidden_size=decoder.hidden_size,
        ffn_hidden_size=decoder.ffn_hidden_size,
        num_attention_heads=decoder.num_attention_heads,
        num_query_groups=decoder.num_kv_heads,
        kv_channels=decoder.head_dim,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Weights are created on the CPU (or meta) and, with TP, sliced from one full
        # master tensor: the same seed gives the same model for every TP size.
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        init_method_std=decoder.init_std,
        normalization="RMSNorm",
        layernorm_epsilon=decoder.norm_eps,
        gated_linear_unit=decoder.arch == "gemma2",
        add_bias_linear=decoder.arch == "bart",
        hidden_dropout=decoder.dropout,
        attention_dropout=decoder.attention_dropout,
        gradient_accumulation_fusion=False,
        # Softmax in fp32 inside the attention back-ends; megatron's own fused softmax unused.
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=False,
        batch_p2p_sync=torch.cuda.is_available(),
    )


def with_sequence_parallel(config: TransformerConfig, enabled: bool) -> TransformerConfig:
    """A shallow copy of ``config`` with ``sequence_parallel`` set (for layers that read a
    replicated, full-sequence input such as the encoder output)."""
    if config.sequence_parallel == enabled:
        return config
    new = dataclasses.replace(config)
    new.sequence_parallel = enabled
    return new
