"""The training loop behind ``torchrun -m mmcap.train`` (Megatron-LM ``pretrain`` style).

One process per GPU (or per CPU slot on gloo); torchrun's environment gives rank, world size
and the rendezvous, so the same command runs on one node or many. Per step:

1. every rank takes its data-parallel slice of the next global batch from the task-language
   sampler (every TP / PP rank of one model replica computes the same slice), padded once
   to the longest sample, so all micro-batches of the step share one shape (pipeline p2p);
2. :func:`mmcap.train.step.train_step` runs megatron-core's schedule over the micro-batches
   (no pipelining / 1F1B / interleaved) and one optimizer step (DDP + distributed optimizer);
   a non-finite loss or gradient skips the update (``max_bad_steps`` in a row stop the run);
3. the LR scheduler advances on successful updates (Megatron-LM), metrics are logged by the
   global last rank (a last pipeline stage), validation and checkpoints run at their
   intervals, and a SIGTERM seen by any rank makes every rank checkpoint and exit 0.

The data state (sampler position) of the last consumed batch is saved with every checkpoint,
so a resumed run continues with exactly the batches the uninterrupted run would have used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from mmcap.config import ConfigError
from mmcap.train.config import TrainConfig
from mmcap.train.data import current_device

log = logging.getLogger("mmcap.train")

EXIT_OK = 0
EXIT_BAD_STEPS = 3


class _SignalFlag:
    """Remembers a SIGTERM (the loop asks every rank with one all-reduce per step)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handler) for s in signals}

    def _handler(self, signum, _frame):
        self.received = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _is_log_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def build_chunks(cfg: TrainConfig, model_cfg):
    """This rank's model chunk(s) (one per virtual pipeline stage), on the GPU if there is one."""
    from mmcap.model.build import build_model

    vpp = cfg.parallel.virtual_pipeline_parallel
    stages = list(range(vpp)) if vpp and vpp > 1 else [None]
    chunks = [
        build_model(model_cfg, cfg.parallel, cfg.precision, vp_stage=v, recompute=cfg.recompute)
        for v in stages
    ]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    return chunks


def optimizer_config(cfg: TrainConfig):
    """megatron-core OptimizerConfig for the run: AdamW, distributed optimizer (ZeRO-1), fp32
    main parameters for bf16 / fp16 weights, grad clipping, loss scaling.

    bf16 runs use a constant loss scale of 1.0 unless ``optim.loss_scale`` is set: it costs one
    pass over the gradients and makes megatron-core's optimizer skip steps with non-finite
    gradients (it checks only when a scaler exists); fp16 uses dynamic loss scaling unless
    ``optim.loss_scale`` is set."""
    from megatron.core.optimizer import OptimizerConfig

    o, dtype = cfg.optim, cfg.precision.params_dtype
    loss_scale = o.loss_scale if o.loss_scale is not None else (1.0 if dtype == "bf16" else None)
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
        loss_scale=loss_scale if dtype != "fp32" else None,
        initial_loss_scale=o.initial_loss_scale,
        use_distributed_optimizer=True,
    )


def build_scheduler(cfg: TrainConfig, optimizer):
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
    )


def _elapsed_minutes(start: float) -> float:
    """Minutes since ``start``, the maximum over ranks (all ranks take the same decision)."""
    t = torch.tensor([(time.time() - start) / 60.0], dtype=torch.float64, device=current_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _prune(save_dir: Path, keep_last: int | None) -> None:
    if keep_last is None or not _rank0():
        return
    steps = sorted(p for p in save_dir.glob("step_*") if p.is_dir() and "." not in p.name)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    from mmcap.train.checkpoint import STATE_FILE, latest_checkpoint

    r = cfg.checkpoint.resume
    if r in (None, "none", "no", False):
        return None
    if r == "auto":
        return latest_checkpoint(cfg.checkpoint.save) if cfg.checkpoint.save else None
    path = Path(r)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ConfigError(f"checkpoint.resume: {path} is not a training checkpoint")
    return latest


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> int:
    """Run (or continue) a training run; returns the process exit code."""
    from megatron.core import parallel_state

    from mmcap.checkpoint import load_model_checkpoint
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.checkpoint import load_train_state, save_train_state
    from mmcap.train.data import BatchSource, StepCounter
    from mmcap.train.flops import mfu, peak_tflops
    from mmcap.train.logger import MetricsLogger, memory_stats
    from mmcap.train.step import build_optimizer, train_step, wrap_model

    model_cfg = cfg.model_config()
    initialize_model_parallel(cfg.parallel, seed=cfg.seed)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg.num_microbatches(dp_size)  # validate the batch layout before building anything

    chunks = build_chunks(cfg, model_cfg)
    resume = resolve_resume(cfg)
    if resume is None and cfg.checkpoint.load:
        log.info("initial weights from %s", cfg.checkpoint.load)
        load_model_checkpoint(chunks, cfg.checkpoint.load)
    ddp = wrap_model(chunks, grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32)
    optimizer = build_optimizer(ddp, optimizer_config(cfg))
    scheduler = build_scheduler(cfg, optimizer)
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    # A feature cache replaces the vision tower: its FLOPs are not spent.
    step_counts = StepCounter(model_cfg, count_vision=not cfg.data.features)
    data = BatchSource(cfg, model_cfg, needs_pixels=first_stage, dp_rank=dp_rank, dp_size=dp_size)

    step, consumed, skipped_total = 0, 0, 0
    if resume is not None:
        state = load_train_state(resume, ddp, optimizer, scheduler)
        step, consumed = int(state["step"]), int(state["consumed_samples"])
        skipped_total = int(state.get("skipped_steps", 0))
        data.load_state_dict(state["sampler"])
        log.info("resumed from %s at step %d (%d samples seen)", resume, step, consumed)

    save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
    log_rank = _is_log_rank()
    lc = cfg.logging
    tb_dir = lc.tensorboard_dir
    if tb_dir is None and save_dir is not None:
        tb_dir = str(save_dir / "tensorboard")
    metrics_file = lc.metrics_file or (str(save_dir / "metrics.jsonl") if save_dir else None)
    if save_dir is not None and _rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if dist.is_initialized():
        dist.barrier()
    logger = MetricsLogger(
        enabled=log_rank,
        tensorboard_dir=tb_dir or None,
        wandb_project=lc.wandb_project,
        wandb_name=lc.wandb_name,
        wandb_config=cfg.to_dict(),
        metrics_file=metrics_file,
        total_steps=cfg.train_steps,
    )
    peak = (
        lc.peak_tflops
        if lc.peak_tflops is not None
        else peak_tflops(dtype=cfg.precision.params_dtype)
    )
    valid = None
    if cfg.eval.interval and cfg.data.valid:
        from mmcap.data.indexed import CaptionDataset

        valid = CaptionDataset(cfg.data.valid)

    def save(reason: str) -> None:
        if save_dir is None:
            return
        t0 = time.perf_counter()
        save_train_state(
            save_dir,
            step,
            ddp,
            optimizer,
            scheduler,
            model_cfg,
            extra={
                "consumed_samples": consumed,
                "skipped_steps": skipped_total,
                "sampler": last_state,
            },
        )
        _prune(save_dir, cfg.checkpoint.keep_last)
        log.info(
            "saved step %d (%s) to %s in %.1f s", step, reason, save_dir, time.perf_counter() - t0
        )

    def validate() -> None:
        from mmcap.data.config import BatchConfig
        from mmcap.eval.loss import evaluate_loss

        rows = range(min(len(valid), cfg.eval.max_samples or len(valid)))
        t0 = time.perf_counter()
        res = evaluate_loss(
            ddp,
            valid,
            micro_batch_size=cfg.eval.micro_batch_size,
            rows=rows,
            batch_cfg=BatchConfig(
                max_prompt_tokens=cfg.data.max_prompt_tokens,
                max_target_tokens=cfg.data.max_target_tokens,
            ),
        )
        m = {f"eval/{k}": v["ce"] for k, v in res.splits.items() if v["ce"] is not None}
        m.update({f"eval_key/{k}": v["ce"] for k, v in res.keys.items() if v["ce"] is not None})
        m["eval/time_s"] = time.perf_counter() - t0
        logger.log(step, m, console=False)
        if log_rank:
            log.info(
                "eval at step %d: %s",
                step,
                "  ".join(
                    f"{k} {v['ce']:.4f} ({v['samples']})"
                    for k, v in res.splits.items()
                    if v["ce"] is not None
                ),
            )

    last_state = data.state_dict()
    run_start = time.time()
    flag = _SignalFlag()
    bad_in_row = 0
    decode_failures = 0
    dynamic_scaling = cfg.precision.params_dtype == "fp16" and cfg.optim.loss_scale is None
    exit_code = EXIT_OK
    log.info(
        "training %s: layout TP=%d PP=%d DP=%d, %d micro-batches of %d per step, steps %d -> %d",
        model_cfg.name,
        cfg.parallel.tensor_parallel,
        cfg.parallel.pipeline_parallel,
        dp_size,
        data.num_microbatches,
        cfg.micro_batch_size,
        step,
        cfg.train_steps,
    )
    try:
        while step < cfg.train_steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # the LR this step uses
            mbs, batch = data.next()
            t_data = time.perf_counter() - t0
            res = train_step(ddp, optimizer, mbs, encoder_hidden=model_cfg.encoder.hidden_size)
            counts = step_counts(batch).to(current_device())
            if dist.is_initialized():
                dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
            samples, images, flops = counts.tolist()
            # One world all-reduce: images that failed to decode (blank instead; first-stage
            # ranks decode, every TP rank of a replica the same batch) and SIGTERM on any rank.
            world_flags = torch.tensor(
                [float(batch.decode_failures), float(flag.received is not None)],
                device=current_device(),
            )
            if dist.is_initialized():
                dist.all_reduce(world_flags)
            decode_failures += int(world_flags[0].item()) // cfg.parallel.tensor_parallel
            terminate = bool(world_flags[1].item() > 0)
            dt = time.perf_counter() - t0
            step += 1
            consumed += int(samples)
            last_state = batch.state
            if res["skipped"] is None:
                scheduler.step(increment=1)
                bad_in_row = 0
            elif dynamic_scaling and res["skipped"] == "non-finite gradients":
                # fp16 loss-scale calibration (megatron-core halves the scale): expected, not
                # a bad step; Megatron-LM counts these as skipped iterations too.
                skipped_total += 1
                if log_rank:
                    log.info(
                        "step %d skipped: fp16 gradient overflow, loss scale now %g",
                        step,
                        optimizer.get_loss_scale().item(),
                    )
            else:
                skipped_total += 1
                bad_in_row += 1
                if log_rank:
                    log.warning(
                        "step %d skipped: %s (loss %s); %d in a row, stop at %d",
                        step,
                        res["skipped"],
                        res["loss"],
                        bad_in_row,
                        cfg.max_bad_steps,
                    )
            tflops = flops / dt / world / 1e12
            metrics = {
                "loss": res["loss"],
                "lr": lr,
                "grad_norm": res["grad_norm"],
                "tokens_per_s": res["tokens"] / dt,
                "samples_per_s": samples / dt,
                "images_per_s": images / dt,
                "tflops_per_gpu": tflops,
                "mfu": mfu(tflops * 1e12, peak) if peak else None,
                "step_time_s": dt,
                "data_time_s": t_data,
                "consumed_samples": consumed,
                "skipped_steps": skipped_total,
                "data/decode_failures": decode_failures,
                "loss_scale": optimizer.get_loss_scale().item()
                if cfg.precision.params_dtype == "fp16"
                else None,
                **{f"loss/{k}": v for k, v in res["key_loss"].items()},
            }
            if step % lc.log_interval == 0 or step == 1 or step == cfg.train_steps:
                metrics.update(memory_stats())
                console = True
            else:
                console = False
            logger.log(step, {k: v for k, v in metrics.items() if v is not None}, console=console)
            if bad_in_row >= cfg.max_bad_steps:
                msg = (
                    f"stopping at step {step}: {bad_in_row} steps in a row had a non-finite loss "
                    f"or gradients (max_bad_steps={cfg.max_bad_steps}); no checkpoint was written "
                    f"for them. Lower the LR, check the data, or resume from "
                    f"{(save_dir / 'latest') if save_dir else 'an earlier checkpoint'}."
                )
                log.error(msg)
                exit_code = EXIT_BAD_STEPS
                break
            if terminate:  # preemption: save now, no validation first
                log.info("signal %s: checkpointing step %d and exiting", flag.received, step)
                save("signal")
                break
            if valid is not None and step % cfg.eval.interval == 0:
                validate()
            saved = False
            if (
                cfg.checkpoint.save_interval
                and step % cfg.checkpoint.save_interval == 0
                and bad_in_row == 0  # nothing new is saved during a run of bad steps
            ):
                save("interval")
                saved = True
            stop = None
            if cfg.exit_interval and step % cfg.exit_interval == 0 and step < cfg.train_steps:
                stop = f"exit_interval {cfg.exit_interval}"
            elif cfg.exit_duration_minutes is not None and _elapsed_minutes(run_start) >= (
                cfg.exit_duration_minutes
            ):
                stop = f"exit_duration_minutes {cfg.exit_duration_minutes}"
            if stop is not None:
                log.info("%s: checkpointing step %d and exiting", stop, step)
                if not saved:
                    save("exit")
                break
        else:
            if valid is not None and step % cfg.eval.interval != 0:
                validate()
            if save_dir is not None and not (
                cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
            ):
                save("end")
    finally:
        flag.restore()
        logger.close()
    return exit_code


def run(cfg: TrainConfig) -> int:
    """Set up logging and the process group, train, tear down; returns the exit code."""
    from mmcap.parallel import init_process_group

    rank = int(os.environ.get("RANK", "0"))
    warnings.filterwarnings(
        "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if rank != int(os.environ.get("WORLD_SIZE", "1")) - 1:
        # Only the logging rank (last) and rank 0 (checkpoint messages) speak at INFO.
        logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    init_process_group()
    try:
        code = train(cfg)
    finally:
        from megatron.core import parallel_state

        if dist.is_initialized():
            dist.barrier()
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return code
