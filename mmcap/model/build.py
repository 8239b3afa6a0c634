"""Factories for the decoder of a pipeline stage (``build_*``, STYLE.md 9)."""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state

from mmcap.config import DecoderConfig, ParallelConfig, PrecisionConfig
from mmcap.config.parallel import validate_decoder_layout
from mmcap.model.gemma2.decoder import Gemma2Decoder
from mmcap.model.transformer_config import build_decoder_transformer_config


def build_gemma2_decoder(
    decoder: DecoderConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    meta: bool = False,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> Gemma2Decoder:
    """Build this rank's stage of the Gemma-2 decoder.

    megatron-core's ``parallel_state`` must be initialised with the same layout
    (:func:`mmcap.parallel.initialize_model_parallel`). ``pre_process`` / ``post_process``
    default to whether this rank is the first / last pipeline stage.

    Args:
        meta: build on the meta device (no memory; for sizing the 11.2B model).
    """
    parallel = parallel or ParallelConfig()
    if (
        parallel.tensor_parallel != parallel_state.get_tensor_model_parallel_world_size()
        or parallel.pipeline_parallel != parallel_state.get_pipeline_model_parallel_world_size()
    ):
        raise ValueError(
            f"parallel config TP={parallel.tensor_parallel} PP={parallel.pipeline_parallel} does "
            f"not match the initialised megatron-core groups "
            f"(TP={parallel_state.get_tensor_model_parallel_world_size()}, "
            f"PP={parallel_state.get_pipeline_model_parallel_world_size()})"
        )
    validate_decoder_layout(decoder, parallel)
    config = build_decoder_transformer_config(decoder, parallel, precision)
    vp_size = config.virtual_pipeline_model_parallel_size
    if pre_process is None:
        pre_process = (
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            if vp_size
            else parallel_state.is_pipeline_first_stage()
        )
    if post_process is None:
        post_process = (
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            if vp_size
            else parallel_state.is_pipeline_last_stage()
        )
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device:
        return Gemma2Decoder(
            config, decoder, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
