"""Everything a training run needs, built in order (:func:`build_trainer`): megatron-core
process groups, this rank's model chunks (the same builder evaluation uses), initial weights,
DDP, the distributed optimizer, the LR scheduler, the data, the checkpointer, the validator and
the metrics logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mmcap.train.config import TrainConfig

log = logging.getLogger("mmcap.train")


def is_log_rank() -> bool:
    """The global last rank (a last pipeline stage: it holds the loss) logs metrics."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def optimizer_config(cfg: TrainConfig):
    """megatron-core OptimizerConfig for the run: AdamW, distributed optimizer (ZeRO-1), fp32
    main parameters for bf16 / fp16 weights, grad clipping, loss scaling.

    bf16 and fp32 runs use a constant loss scale of 1.0 unless ``optim.loss_scale`` is set: it
    costs one pass over the gradients and makes megatron-core's optimizer skip steps with
    non-finite gradients (it checks only when a scaler exists), so no dtype ever applies a NaN
    update; fp16 uses dynamic loss scaling unless ``optim.loss_scale`` is set."""
    from megatron.core.optimizer import OptimizerConfig

    o, dtype = cfg.optim, cfg.precision.params_dtype
    loss_scale = o.loss_scale if o.loss_scale is not None else (None if dtype == "fp16" else 1.0)
    return OptimizerConfig(
        optimizer="adam",  # megatron-core's "adam" is AdamW (decoupled weight decay)
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        params_dtype=cfg.precision.torch_dtype,
        loss_scale=loss_scale,
        initial_loss_scale=o.initial_loss_scale,
        use_distributed_optimizer=True,
    )


def build_scheduler(cfg: TrainConfig, optimizer):
    """megatron-core OptimizerParamScheduler: linear warmup, then ``optim.decay_style`` to
    ``min_lr`` at ``train_steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train_steps,
        wd_incr_style="constant",
        # Resuming: the schedule of the command line when overriding (Megatron-LM's
        # --override-opt_param-scheduler); else a differing one is refused before the load
        # (mmcap.train.checkpointer.check_schedule), so the checkpoint's values are the same.
        override_opt_param_scheduler=o.override_scheduler,
        use_checkpoint_opt_param_scheduler=not o.override_scheduler,
    )


def _inference_files(cfg: TrainConfig, model_cfg, load, resume_from) -> dict:
    """The ``inference/`` folder every checkpoint carries (rank 0 writes it; empty elsewhere
    and when the run has no tokenizers)."""
    from mmcap.checkpoint.inference_assets import find_run_tokenizers, inference_files

    if cfg.checkpoint.save is None or (dist.is_initialized() and dist.get_rank() != 0):
        return {}
    tokenizers = find_run_tokenizers(cfg.data.train, load=load, resume=resume_from)
    if tokenizers is not None:
        log.info("checkpoints carry inference/: the tokenizers of %s", tokenizers.origin)
    return inference_files(model_cfg, cfg.data.batch, tokenizers)


@dataclass
class Trainer:
    """The parts of a run (:func:`build_trainer`); :func:`mmcap.train.loop.train` drives them."""

    cfg: TrainConfig
    model_cfg: object
    chunks: list  # DDP-wrapped model chunks of this rank
    optimizer: object
    scheduler: object
    data: object  # mmcap.train.data.BatchSource
    counter: object  # mmcap.train.data.StepCounter
    checkpointer: object  # mmcap.train.checkpointer.Checkpointer
    validator: object  # mmcap.train.validator.Validator
    logger: object  # mmcap.train.logger.MetricsLogger
    dp_size: int


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Build every part of the run on this rank (collective: every rank calls it)."""
    from megatron.core import parallel_state

    from mmcap.checkpoint import load_model_checkpoint
    from mmcap.model.build import build_model_chunks
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.checkpointer import Checkpointer, decide_resume, resolve_load
    from mmcap.train.data import BatchSource, StepCounter
    from mmcap.train.flops import peak_tflops
    from mmcap.train.logger import MetricsLogger
    from mmcap.train.step import build_optimizer, wrap_model
    from mmcap.train.validator import Validator

    model_cfg = cfg.model_config()
    initialize_model_parallel(cfg.parallel, seed=cfg.seed)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    cfg.num_microbatches(dp_size)  # validate the batch layout before building anything
    resume_from = decide_resume(cfg.checkpoint)  # before any heavy work
    load = resolve_load(cfg.checkpoint.load) if resume_from is None and cfg.checkpoint.load else None
    # The data (and its fit with the model's tokenizers) before the model too.
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    data = BatchSource(cfg, model_cfg, needs_pixels=first_stage, dp_rank=dp_rank, dp_size=dp_size)
    validator = Validator(cfg)

    chunks = build_model_chunks(model_cfg, cfg.parallel, cfg.precision, recompute=cfg.recompute)
    if load is not None:
        log.info("initial weights from %s", load)
        load_model_checkpoint(chunks, load)
    if cfg.compile.enable:
        from mmcap.model.compile import compile_layers

        n = compile_layers(chunks, backend=cfg.compile.backend)
        log.info("torch.compile (%s): %d transformer layers", cfg.compile.backend, n)
    ddp = wrap_model(chunks, grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32)
    optimizer = build_optimizer(
        ddp, optimizer_config(cfg), cfg.optim.weight_decay_rule, cfg.optim.implementation
    )
    scheduler = build_scheduler(cfg, optimizer)
    validator.chunks = ddp
    # A feature cache replaces the vision tower: its FLOPs are not spent.
    counter = StepCounter(model_cfg, count_vision=not cfg.data.features)

    save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
    lc = cfg.logging
    tb_dir = lc.tensorboard_dir
    if tb_dir is None and save_dir is not None:
        tb_dir = str(save_dir / "tensorboard")
    metrics_file = lc.metrics_file or (str(save_dir / "metrics.jsonl") if save_dir else None)
    if save_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        save_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    logger = MetricsLogger(
        enabled=is_log_rank(),
        tensorboard_dir=tb_dir or None,
        wandb_project=lc.wandb_project,
        wandb_name=lc.wandb_name,
        wandb_config=cfg.to_dict(),
        metrics_file=metrics_file,
        total_steps=cfg.train_steps,
        log_interval=lc.log_interval,
        peak_tflops=lc.peak_tflops
        if lc.peak_tflops is not None
        else peak_tflops(dtype=cfg.precision.params_dtype),
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
    )
    return Trainer(
        cfg=cfg,
        model_cfg=model_cfg,
        chunks=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        counter=counter,
        checkpointer=Checkpointer(
            cfg.checkpoint,
            model_cfg,
            ddp,
            optimizer,
            scheduler,
            resume_from=resume_from,
            extra_files=_inference_files(cfg, model_cfg, load, resume_from),
        ),
        validator=validator,
        logger=logger,
        dp_size=dp_size,
    )
