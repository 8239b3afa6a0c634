"""The training loop behind ``torchrun -m mmcap.train`` (Megatron-LM ``pretrain`` style).

One process per GPU (or per CPU slot on gloo); torchrun's environment gives rank, world size
and the rendezvous, so the same command runs on one node or many. Per step:

1. every rank takes its data-parallel slice of the next global batch from the task-language
   sampler (every TP / PP rank of one model replica computes the same slice), padded once
   to the longest sample, so all micro-batches of the step share one shape (pipeline p2p);
2. :func:`mmcap.train.step.train_step` runs megatron-core's schedule over the micro-batches
   (no pipelining / 1F1B / interleaved) and one optimizer step (DDP + distributed optimizer);
   a non-finite loss or gradient skips the update (``max_bad_steps`` in a row stop the run);
   the loss, the batch counts and the decode / signal flags are reduced together (one
   all-reduce, one host read per step: :mod:`mmcap.train.step_stats`);
3. the LR scheduler advances on successful updates (Megatron-LM), metrics are logged by the
   global last rank (a last pipeline stage), validation and checkpoints run at their
   intervals (one save policy: :mod:`mmcap.train.checkpointer`), and a SIGTERM or SIGINT seen
   by any rank makes every rank checkpoint and exit 0 (:class:`StopConditions`).

The data state (sampler position) of the last consumed batch is saved with every checkpoint,
so a resumed run continues with exactly the batches the uninterrupted run would have used.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from mmcap.parallel.lifetime import die_with_parent, forkserver_dies_with_parent
from mmcap.train.builder import Trainer, build_trainer, is_log_rank
from mmcap.train.config import TrainConfig
from mmcap.train.state import TrainState
from mmcap.train.step import train_step
from mmcap.train.step_stats import HostStats

log = logging.getLogger("mmcap.train")

EXIT_OK = 0
EXIT_BAD_STEPS = 3


class StopConditions:
    """The one exit decision of the loop, asked after every step (:meth:`check`):

    - ``bad_stop``: ``max_bad_steps`` non-finite steps in a row (exit 3, nothing saved);
    - ``signal``: SIGTERM or SIGINT on any rank (every rank checkpoints and exits 0). A second
      SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once;
    - ``exit``: ``exit_interval`` or ``exit_duration_minutes`` reached before the last step;
    - None: go on (the loop itself ends after ``train_steps``: ``end``).

    The signal handlers are installed on construction and restored by :meth:`restore`.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.start = time.time()
        self.received: int | None = None
        self._previous = {
            s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handler(self, signum, _frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.received = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def check(
        self, state: TrainState, signalled: bool, elapsed_minutes: float | None = None
    ) -> str | None:
        """``signalled``: any rank saw a signal; ``elapsed_minutes``: the maximum over ranks
        (:class:`mmcap.train.step_stats.StepStats`), the same on every rank. Not collective."""
        cfg = self.cfg
        if state.bad_in_row >= cfg.max_bad_steps:
            return "bad_stop"
        if signalled:
            return "signal"
        last = state.step >= cfg.train_steps
        if cfg.exit_interval and state.step % cfg.exit_interval == 0 and not last:
            return "exit"
        if cfg.exit_duration_minutes is not None and not last:
            if elapsed_minutes is None:
                raise ValueError("exit_duration_minutes is set: check() needs elapsed_minutes")
            if elapsed_minutes >= cfg.exit_duration_minutes:
                return "exit"
        return None


def run_step(
    t: Trainer, state: TrainState, stop: StopConditions, mbs, batch, t0: float, t_data: float
) -> str | None:
    """One step on a fetched batch: :func:`train_step` (this rank's batch counts and flags are
    reduced with the loss: one all-reduce and one device->host copy for the whole step), the
    state, the metrics, the stop decision (returned: :meth:`StopConditions.check`)."""
    cfg = t.cfg
    fp16 = cfg.precision.params_dtype == "fp16"
    host = HostStats(
        counts=t.counter(batch),
        decode_failures=batch.decode_failures,
        signalled=lambda: stop.received is not None,
        start_time=stop.start if cfg.exit_duration_minutes is not None else None,
    )
    result = train_step(
        t.chunks,
        t.optimizer,
        mbs,
        encoder_hidden=t.model_cfg.encoder.hidden_size,
        scheduler=t.scheduler,
        loss_averaging=cfg.optim.loss_averaging,
        host_stats=host,
    )
    g = result.stats
    overflow = fp16 and cfg.optim.loss_scale is None and result.skipped == "non-finite gradients"
    state.record(
        samples=int(g.samples), sampler=batch.state, skipped=result.skipped, overflow=overflow
    )
    # Every TP rank of a replica decoded the same batch (reduce_step_stats divides by TP).
    state.decode_failures += g.decode_failures
    if result.skipped is not None:
        _log_skip(t, state, result, overflow)
    t.logger.log_step(
        state,
        result,
        samples=g.samples,
        images=g.images,
        flops=g.flops,
        useful=g.useful,
        step_time=time.perf_counter() - t0,
        data_time=t_data,
        # fp16: a device read (a sync) on the logging rank only.
        loss_scale=t.optimizer.get_loss_scale().item() if fp16 and is_log_rank() else None,
    )
    return stop.check(state, g.signalled, g.elapsed_minutes)


def _log_skip(t: Trainer, state: TrainState, result, overflow: bool) -> None:
    if not is_log_rank():
        return
    if overflow:
        scale = t.optimizer.get_loss_scale().item()
        log.info("step %d skipped: fp16 gradient overflow, loss scale now %g", state.step, scale)
    else:
        log.warning(
            "step %d skipped: %s (loss %s); %d in a row, stop at %d",
            state.step,
            result.skipped,
            result.loss,
            state.bad_in_row,
            t.cfg.max_bad_steps,
        )


def train(cfg: TrainConfig) -> int:
    """Run (or continue) a training run; returns the process exit code."""
    t = build_trainer(cfg)
    state = t.checkpointer.resume(t.data) or TrainState(sampler=t.data.state_dict())
    t.checkpointer.record_config(cfg)
    stop = StopConditions(cfg)
    p = cfg.parallel
    layout = (
        f"packed rows {t.data.enc_row} / {t.data.dec_row} tokens (encoder / decoder), "
        f"micro-batches of {cfg.micro_batch_size} rows"
        if cfg.data.packing
        else f"{t.data.num_microbatches} micro-batches of {cfg.micro_batch_size} per step"
    )
    log.info(
        "training %s: layout TP=%d PP=%d DP=%d, %s, steps %d -> %d",
        t.model_cfg.name,
        p.tensor_parallel,
        p.pipeline_parallel,
        t.dp_size,
        layout,
        state.step,
        cfg.train_steps,
    )
    if is_log_rank():
        for line in t.data.summary(cfg.train_steps, cfg.global_batch_size):
            (log.warning if line.startswith("WARNING") else log.info)(line.removeprefix("WARNING "))
    if state.step >= cfg.train_steps:
        log.info("the run is already complete at step %d (train_steps=%d)", state.step, cfg.train_steps)
    event = "end"
    try:
        while state.step < cfg.train_steps:
            t0 = time.perf_counter()
            mbs, batch = t.data.next()
            t_data = time.perf_counter() - t0
            event = run_step(t, state, stop, mbs, batch, t0, t_data)
            if event in (None, "exit") and t.validator.due(state.step, state.step == cfg.train_steps):
                t.logger.log_eval(state.step, t.validator(state.step))
            if event is not None:
                break
            t.checkpointer.maybe_save(state, "interval")
        else:
            event = "end"
        _announce(event, state, cfg, stop)
        t.checkpointer.maybe_save(state, event)
    finally:
        stop.restore()
        t.data.close()
        t.logger.close()
    return EXIT_BAD_STEPS if event == "bad_stop" else EXIT_OK


def _announce(event: str, state: TrainState, cfg: TrainConfig, stop: StopConditions) -> None:
    if event == "bad_stop":
        save = Path(cfg.checkpoint.save) / "latest" if cfg.checkpoint.save else None
        log.error(
            "stopping at step %d: %d steps in a row had a non-finite loss or gradients "
            "(max_bad_steps=%d); no checkpoint was written for them. Lower the LR, check the "
            "data, or resume from %s.",
            state.step,
            state.bad_in_row,
            cfg.max_bad_steps,
            save or "an earlier checkpoint",
        )
    elif event == "signal":
        log.info("signal %s: checkpointing step %d and exiting", stop.received, state.step)
    elif event == "exit":
        log.info("exit_interval / exit_duration_minutes: checkpointing step %d and exiting", state.step)


# The same notices for child interpreters (the forkserver and DataLoader workers import
# megatron-core afresh): PYTHONWARNINGS entries, each a literal prefix of the message.
CHILD_WARNING_FILTERS = (
    "ignore:Transformer Engine and Apex are not installed",
    "ignore:Transformer Engine is not installed",
    "ignore:Apex is not installed",
)


def quiet_third_party_warnings() -> None:
    """Megatron-core's import-time TE / Apex fallback notices and torch.distributed
    FutureWarnings: expected on CPU and without the optional extras; call before importing
    megatron-core (and before any worker process starts: they inherit PYTHONWARNINGS)."""
    warnings.filterwarnings(
        "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    have = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(
        have + [w for w in CHILD_WARNING_FILTERS if w not in have]
    )


def setup_logging(cfg: TrainConfig, quiet: bool = False) -> None:
    """Console: INFO from mmcap on the logging rank (last) and rank 0, WARNING elsewhere and
    with ``quiet``; megatron-core's INFO (config dumps) only in the log file. File:
    ``<checkpoint.save>/logs/rank<r>.log`` with everything at INFO."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fmt = logging.Formatter(
        f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING if quiet or rank not in (0, world - 1) else logging.INFO)
    console.addFilter(
        lambda r: r.levelno >= logging.WARNING or not r.name.startswith("megatron")
    )
    root.addHandler(console)
    if cfg.checkpoint.save:
        try:
            logs = Path(cfg.checkpoint.save) / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(logs / f"rank{rank}.log")
        except OSError as e:  # an unwritable save dir is reported (and fails) at the first save
            log.warning("no log file in %s: %s", cfg.checkpoint.save, e)
        else:
            handler.setFormatter(fmt)
            root.addHandler(handler)


def run(cfg: TrainConfig, quiet: bool = False) -> int:
    """Set up logging and the process group, train, tear down; returns the exit code."""
    from mmcap.parallel import init_process_group

    quiet_third_party_warnings()
    setup_logging(cfg, quiet)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: die with the launcher
        die_with_parent()
    forkserver_dies_with_parent()  # DataLoader workers come from it
    init_process_group()
    try:
        code = train(cfg)
    except BaseException:
        _teardown(barrier=False)  # the other ranks may never reach a barrier
        raise
    _teardown(barrier=True)
    return code


def _teardown(barrier: bool) -> None:
    from megatron.core import parallel_state

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
