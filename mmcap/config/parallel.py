"""Typed configuration of the parallel layout and numeric precision, and their validation
against a model (TP must divide heads, PP must divide layers, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmcap.config.errors import ConfigError, require
from mmcap.config.model import DecoderConfig, ModelConfig

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class ParallelConfig:
    """Megatron-style layout: TP x PP x DP (DP is what is left of the world size).

    Args:
        tensor_parallel: tensor-parallel size (Megatron column/row-parallel split of heads, FFN,
            vocabulary).
        pipeline_parallel: pipeline stages; the encoder lives on the first stage, the decoder
            layers are split across all stages.
        virtual_pipeline_parallel: model chunks per stage for the interleaved schedule (None = off).
        sequence_parallel: shard activations along the sequence between TP regions
            (needs tensor_parallel > 1).
        data_parallel: None = world_size // (TP x PP); if given it must match.
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    sequence_parallel: bool = False
    data_parallel: int | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, name)
            require(
                isinstance(v, int) and v >= 1,
                f"ParallelConfig.{name}",
                f"must be an integer >= 1, got {v!r}",
            )
        if self.virtual_pipeline_parallel is not None:
            require(
                self.virtual_pipeline_parallel >= 1,
                "ParallelConfig.virtual_pipeline_parallel",
                "must be None or >= 1",
            )
            require(
                self.pipeline_parallel > 1 or self.virtual_pipeline_parallel == 1,
                "ParallelConfig.virtual_pipeline_parallel",
                "the interleaved schedule needs pipeline_parallel > 1; set it to None",
            )
        if self.sequence_parallel:
            require(
                self.tensor_parallel > 1,
                "ParallelConfig.sequence_parallel",
                "needs tensor_parallel > 1 (it shards activations over the TP group); "
                "set sequence_parallel=False or raise tensor_parallel",
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def resolve_data_parallel(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises if TP x PP does not divide it."""
        mp = self.model_parallel_size
        require(
            world_size % mp == 0,
            "ParallelConfig",
            f"world size {world_size} is not divisible by tensor_parallel x "
            f"pipeline_parallel = {mp}; launch a multiple of {mp} processes",
        )
        dp = world_size // mp
        if self.data_parallel is not None:
            require(
                self.data_parallel == dp,
                "ParallelConfig.data_parallel",
                f"is {self.data_parallel} but world size {world_size} / (TP x PP = {mp}) "
                f"= {dp}; leave it None to derive it",
            )
        return dp


@dataclass
class PrecisionConfig:
    """Numeric precision.

    Args:
        params_dtype: dtype of the model weights and activations ("bf16" default; "fp16" uses
            loss scaling in the trainer; "fp32" for parity tests).
        transformer_impl: linears and norms of the encoder / decoder layers: "local"
            (megatron-core's tensor-parallel linears, torch norms), "transformer_engine"
            (megatron-core's TE extension) or "auto" (TE when importable and CUDA is
            available, else local). See :mod:`mmcap.model.te`.
        fp8: FP8 format of Transformer Engine's linears (None = off): "hybrid" (e4m3 forward,
            e5m2 gradients) or "e4m3". Needs Transformer Engine; attention core and loss stay
            in ``params_dtype``.
        fp8_recipe: megatron-core's FP8 scaling recipe: "delayed" (amax history),
            "tensorwise" (current scaling), "blockwise" or "mxfp8" (Blackwell).
        fp8_amax_history_len: amax history of the delayed recipe.
        grad_reduce_in_fp32: reduce gradients across data-parallel ranks in float32.
    """

    params_dtype: Dtype = "bf16"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = 1024
    grad_reduce_in_fp32: bool = True

    def __post_init__(self) -> None:
        require(
            self.params_dtype in ("fp32", "bf16", "fp16"),
            "PrecisionConfig.params_dtype",
            f"must be 'fp32', 'bf16' or 'fp16', got {self.params_dtype!r}",
        )
        require(
            self.fp8 in (None, "hybrid", "e4m3"),
            "PrecisionConfig.fp8",
            f"must be None, 'hybrid' or 'e4m3', got {self.fp8!r}",
        )
        require(
            self.transformer_impl in ("auto", "local", "transformer_engine"),
            "PrecisionConfig.transformer_impl",
            f"must be 'auto', 'local' or 'transformer_engine', got {self.transformer_impl!r}",
        )
        require(
            self.fp8_recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"),
            "PrecisionConfig.fp8_recipe",
            f"must be 'delayed', 'tensorwise', 'blockwise' or 'mxfp8', got {self.fp8_recipe!r}",
        )
        require(
            self.fp8_amax_history_len >= 1,
            "PrecisionConfig.fp8_amax_history_len",
            f"must be >= 1, got {self.fp8_amax_history_len!r}",
        )
        require(
            self.fp8 is None or self.transformer_impl != "local",
            "PrecisionConfig.fp8",
            "FP8 runs in Transformer Engine's linears, but transformer_impl is 'local'; set "
            "transformer_impl to transformer_engine (or auto), or remove fp8",
        )
        require(
            self.fp8 is None or self.params_dtype != "fp32",
            "PrecisionConfig.fp8",
            "FP8 training keeps bf16 (or fp16) weights and activations around the FP8 GEMMs; "
            "set params_dtype to bf16",
        )

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.params_dtype
        ]


def validate_decoder_layout(decoder: DecoderConfig, parallel: ParallelConfig) -> None:
    """Check that ``parallel`` can split ``decoder``; raise ConfigError naming field and fix."""
    tp = parallel.tensor_parallel
    require(
        decoder.num_attention_heads % tp == 0,
        "ParallelConfig.tensor_parallel",
        f"{tp} does not divide the decoder's num_attention_heads "
        f"{decoder.num_attention_heads}; choose a divisor of it",
    )
    require(
        decoder.num_kv_heads % tp == 0,
        "ParallelConfig.tensor_parallel",
        f"{tp} does not divide the decoder's num_kv_heads {decoder.num_kv_heads} "
        f"(megatron-core splits whole query groups); choose a divisor of "
        f"{decoder.num_kv_heads}",
    )
    require(
        decoder.ffn_hidden_size % tp == 0,
        "ParallelConfig.tensor_parallel",
        f"{tp} does not divide the decoder's ffn_hidden_size {decoder.ffn_hidden_size}",
    )
    chunks = parallel.pipeline_parallel * (parallel.virtual_pipeline_parallel or 1)
    require(
        decoder.num_layers % chunks == 0,
        "ParallelConfig.pipeline_parallel",
        f"pipeline_parallel x virtual_pipeline_parallel = {chunks} does not divide the "
        f"decoder's num_layers {decoder.num_layers}; choose a divisor of "
        f"{decoder.num_layers}",
    )


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check that ``parallel`` can split the whole ``model`` (encoder and decoder)."""
    validate_decoder_layout(model.decoder, parallel)
    tp = parallel.tensor_parallel
    require(
        model.encoder.num_attention_heads % tp == 0,
        "ParallelConfig.tensor_parallel",
        f"{tp} does not divide the encoder's num_attention_heads "
        f"{model.encoder.num_attention_heads}; choose a divisor of it",
    )
    require(
        model.encoder.ffn_hidden_size % tp == 0,
        "ParallelConfig.tensor_parallel",
        f"{tp} does not divide the encoder's ffn_hidden_size {model.encoder.ffn_hidden_size}",
    )


__all__ = [
    "ConfigError",
    "ParallelConfig",
    "PrecisionConfig",
    "validate_decoder_layout",
    "validate_layout",
]
