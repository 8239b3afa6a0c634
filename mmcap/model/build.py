"""Factories for a pipeline stage of the model or of its decoder (``build_*``, STYLE.md 9).

megatron-core's ``parallel_state`` must be initialised with the same layout first
(:func:`mmcap.parallel.initialize_model_parallel`).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state

from mmcap.config import DecoderConfig, ModelConfig, ParallelConfig, PrecisionConfig
from mmcap.config.parallel import validate_decoder_layout, validate_layout
from mmcap.model.captioner import CaptioningModel
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
    recompute: str | None = None,
) -> Gemma2Decoder:
    """Build this rank's stage of the Gemma-2 decoder alone (no vision / encoder).

    ``pre_process`` / ``post_process`` default to whether this rank is the first / last
    pipeline stage.

    Args:
        meta: build on the meta device (no memory; for sizing the 11.2B model).
        recompute: activation recompute in training: None, "selective" (core attention of
            every layer) or "full" (every layer).
    """
    parallel = parallel or ParallelConfig()
    _check_groups(parallel)
    validate_decoder_layout(decoder, parallel)
    config = build_decoder_transformer_config(decoder, parallel, precision, recompute=recompute)
    first, last = _stage_flags(parallel, vp_stage)
    pre_process = first if pre_process is None else pre_process
    post_process = last if post_process is None else post_process
    with torch.device("meta") if meta else contextlib.nullcontext():
        return Gemma2Decoder(
            config, decoder, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    *,
    meta: bool = False,
    vp_stage: int | None = None,
    recompute: str | None = None,
) -> CaptioningModel:
    """Build this rank's stage of the whole captioning model (vision + encoder on the first
    pipeline stage, the decoder split across stages).

    Args:
        meta: build on the meta device (no memory; for sizing).
        vp_stage: virtual-pipeline chunk (interleaved schedule); chunk 0 of stage 0 holds the
            encoder.
        recompute: activation recompute of the encoder and decoder layers in training: None,
            "selective" (core attention of every layer) or "full" (every layer). The frozen
            vision tower runs under no_grad and is never recomputed.
    """
    parallel = parallel or ParallelConfig()
    _check_groups(parallel)
    validate_layout(model, parallel)
    first, last = _stage_flags(parallel, vp_stage)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return CaptioningModel(
            model,
            parallel,
            precision,
            add_encoder=first,
            pre_process=first,
            post_process=last,
            vp_stage=vp_stage,
            recompute=recompute,
        )


def build_model_chunks(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    *,
    recompute: str | None = None,
) -> list[CaptioningModel]:
    """This rank's model chunk(s): one per virtual pipeline stage (interleaved schedule), else
    one; on the current CUDA device when there is one. Training and evaluation both build
    their models here.

    On CUDA the weights are created and initialised on the GPU (a ``torch.device`` context):
    the same algorithm as on the CPU (megatron-core's ``use_cpu_initialization``: one full
    float32 master weight per matrix, drawn from the default generator, which every TP rank
    seeds alike, then this rank's slice), so the model is still the same for every TP size,
    but it draws from the CUDA generator: the values differ from a CPU build with the same
    seed. Initialising the 11.2B model's 45 GB of float32 masters on the CPU took most of its
    110 s build on the H200 (2026-11-29)."""
    vpp = parallel.virtual_pipeline_parallel
    stages = list(range(vpp)) if vpp and vpp > 1 else [None]
    cuda = torch.cuda.is_available()
    with torch.device("cuda", torch.cuda.current_device()) if cuda else contextlib.nullcontext():
        chunks = [
            build_model(model, parallel, precision, vp_stage=v, recompute=recompute)
            for v in stages
        ]
    if cuda:  # anything created outside the context (e.g. TE's device="cpu" parameters)
        chunks = [c.cuda() for c in chunks]
    return chunks


def _stage_flags(parallel: ParallelConfig, vp_stage: int | None) -> tuple[bool, bool]:
    vpp = parallel.virtual_pipeline_parallel
    if vpp and vpp > 1:
        return (
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
    return parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()


def _check_groups(parallel: ParallelConfig) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (parallel.tensor_parallel, parallel.pipeline_parallel) != (tp, pp):
        raise ValueError(
            f"parallel config TP={parallel.tensor_parallel} PP={parallel.pipeline_parallel} does "
            f"not match the initialised megatron-core groups (TP={tp}, PP={pp}); call "
            f"mmcap.parallel.initialize_model_parallel with the same ParallelConfig"
        )
