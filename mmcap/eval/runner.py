"""Checkpoint + dataset -> per-sample CE JSON: what ``tools/eval_loss.py`` runs.

Works in one process (a world of one) and under torchrun with any TP x PP (DP = the rest of
the world): megatron-core's distributed checkpoint loads into any layout, the samples are
split over the DP replicas, and global rank 0 writes the JSON after every rank has the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mmcap.config import ModelConfig, ParallelConfig, PrecisionConfig
from mmcap.data.config import BatchConfig
from mmcap.data.indexed import CaptionDataset
from mmcap.eval.compute import TrainingRun, compute_report
from mmcap.eval.lengths import EVAL_IMAGE_SIZE, check_position_limits, eval_batch_config
from mmcap.eval.loss import evaluate_loss
from mmcap.eval.results import EvalResult, write_results

log = logging.getLogger(__name__)


def eval_model_config(ckpt_dir: str | os.PathLike, image_size: int | None = None) -> ModelConfig:
    """The checkpoint's model config, at ``image_size`` px when given (validated for it)."""
    from mmcap.checkpoint import read_checkpoint_info

    model_cfg, _ = read_checkpoint_info(ckpt_dir)
    if image_size is not None and image_size != model_cfg.vision.image_size:
        model_cfg = dataclasses.replace(
            model_cfg, vision=dataclasses.replace(model_cfg.vision, image_size=image_size)
        )
    return model_cfg


def build_eval_model(
    ckpt_dir: str | os.PathLike,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    image_size: int | None = None,
) -> tuple[list[torch.nn.Module], ModelConfig]:
    """This rank's model chunk(s) of a checkpoint, loaded, on the GPU when there is one.

    megatron-core's groups must already be initialised for ``parallel``.

    Args:
        image_size: evaluate at this resolution instead of the checkpoint's (e.g. 768 for a
            model pretrained at 224; the vision config is validated for it).
    """
    from mmcap.checkpoint import load_model_checkpoint
    from mmcap.model.build import build_model_chunks

    model_cfg = eval_model_config(ckpt_dir, image_size)
    precision = precision or PrecisionConfig("fp32")
    chunks = build_model_chunks(model_cfg, parallel, precision)
    load_model_checkpoint(chunks, ckpt_dir)
    return chunks, model_cfg


def run_eval_loss(
    ckpt_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    micro_batch_size: int = 8,
    image_size: int | None = EVAL_IMAGE_SIZE,
    batch_cfg: BatchConfig | None = None,
    training_run: TrainingRun | None = None,
) -> EvalResult:
    """Initialise the layout, load the checkpoint, evaluate every entry of ``data_dir`` and
    (global rank 0) write ``out``; returns the result on every rank.

    Args:
        image_size: evaluation resolution (default 224 px, the official CE eval's; None = the
            checkpoint's).
        batch_cfg: crop lengths (default :func:`~mmcap.eval.lengths.eval_batch_config`: the
            official 447 prompt / 1024 target tokens, final token kept).
        training_run: steps and batch size of the run that trained the checkpoint; when
            given, the compute report (:mod:`mmcap.eval.compute`) is written as "compute".

    Raises:
        SequenceTooLongError: before any model is built, when an entry would not fit the
            model's position tables at these lengths and this resolution.
    """
    from mmcap.parallel import initialize_model_parallel

    parallel = parallel or ParallelConfig()
    precision = precision or PrecisionConfig("fp32")
    batch_cfg = batch_cfg or eval_batch_config()
    from mmcap.checkpoint import resolve_checkpoint_dir
    from mmcap.data.compat import check_datasets_fit_model

    dataset = CaptionDataset(data_dir)  # fail on a bad dataset before building the model
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)  # a run directory: its newest checkpoint
    model_cfg = eval_model_config(ckpt_dir, image_size)
    check_datasets_fit_model([dataset], model_cfg, "--data")
    check_position_limits(model_cfg, dataset, batch_cfg)
    compute = None
    if training_run is not None:  # parameters are counted on a TP = PP = 1 meta build
        initialize_model_parallel(ParallelConfig(), seed=None)
        compute = compute_report(model_cfg, training_run)
    initialize_model_parallel(parallel, seed=1234)
    chunks, model_cfg = build_eval_model(ckpt_dir, parallel, precision, image_size)
    result = evaluate_loss(chunks, dataset, micro_batch_size=micro_batch_size, batch_cfg=batch_cfg)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if out is not None and rank0:
        from megatron.core import parallel_state

        meta = {
            "ckpt": str(Path(ckpt_dir).resolve()),
            "data": str(Path(data_dir).resolve()),
            "preset": model_cfg.name,
            "image_size": model_cfg.vision.image_size,
            "precision": precision.params_dtype,
            "layout": {
                "tp": parallel.tensor_parallel,
                "pp": parallel.pipeline_parallel,
                "dp": parallel_state.get_data_parallel_world_size(),
            },
            "micro_batch_size": micro_batch_size,
            "max_prompt_tokens": batch_cfg.max_prompt_tokens,
            "max_target_tokens": batch_cfg.max_target_tokens,
            "keep_eos_on_crop": batch_cfg.keep_eos_on_crop,
        }
        write_results(result, out, meta, compute)
        log.info("wrote %s (%d samples)", out, len(result.samples))
    if dist.is_initialized():
        dist.barrier()  # the file exists when any rank returns
    return result
