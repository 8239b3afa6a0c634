"""When a training run saves, what it resumes from, and pruning: the :class:`Checkpointer`.

The storage format (megatron-core dist checkpoints, ``step_N.partial`` -> ``step_N``, the
atomic ``latest`` pointer) lives in :mod:`mmcap.train.checkpoint`; this module owns the ONE
save policy (:meth:`Checkpointer.should_save`):

- ``interval``: every ``checkpoint.save_interval`` steps, unless the current step is part of a
  run of non-finite steps (``bad_in_row > 0``): a run that then stops for bad steps keeps
  ``latest`` on the last good step;
- ``signal`` / ``exit`` / ``end``: the run stops (SIGTERM / SIGINT, ``exit_interval`` or
  ``exit_duration_minutes``, the last step): always saved. A skipped update leaves the
  weights of the last good step, so this state is finite and resumable;
- ``bad_stop``: ``max_bad_steps`` non-finite steps in a row: never saved;
- a step is never saved twice.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from mmcap.checkpoint.integrity import CheckpointError
from mmcap.config import ConfigError
from mmcap.train.config import CheckpointConfig
from mmcap.train.state import TrainState

log = logging.getLogger("mmcap.train")

EVENTS = ("interval", "signal", "exit", "end", "bad_stop")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Checkpointer:
    """Saves, prunes and resumes the training state of one run.

    Args:
        cfg: the run's ``checkpoint`` section.
        model_cfg: written next to every checkpoint (``mmcap_model.json``).
        chunks / optimizer / scheduler: this rank's DDP chunks, megatron-core optimizer and
            LR scheduler.
        resume_from: the checkpoint to continue from (:func:`decide_resume`), None = fresh.
        extra_files: written into every checkpoint by rank 0 (the ``inference/`` folder,
            :func:`mmcap.checkpoint.inference_assets.inference_files`).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        model_cfg,
        chunks,
        optimizer,
        scheduler,
        resume_from: Path | None = None,
        extra_files: dict | None = None,
    ):
        self.cfg = cfg
        self.save_dir = Path(cfg.save) if cfg.save else None
        self.model_cfg = model_cfg
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.last_saved_step: int | None = None
        self.resume_from = resume_from
        self.extra_files = extra_files or {}

    # -- resume -----------------------------------------------------------------------------

    def resume(self, data) -> TrainState | None:
        """Load the resume checkpoint (if any) into model, optimizer, scheduler and ``data``;
        returns its state, or None for a fresh run."""
        from mmcap.train.checkpoint import load_train_state

        path = self.resume_from
        if path is None:
            return None
        check_schedule(path, self.scheduler, override=self.scheduler.override_opt_param_scheduler)
        raw = load_train_state(path, self.chunks, self.optimizer, self.scheduler)
        if self.scheduler.override_opt_param_scheduler:
            # The optimizer's param groups came back with the checkpoint's max / min LR, which
            # megatron-core's scheduler reads per group: the new schedule must reach them too.
            for group in self.optimizer.param_groups:
                group["max_lr"], group["min_lr"] = self.scheduler.max_lr, self.scheduler.min_lr
            self.scheduler.step(increment=0)
        state = TrainState.from_state_dict(raw)
        data.load_state_dict(state.sampler)
        self.last_saved_step = state.step
        log.info(
            "resumed from %s at step %d (%d samples seen)", path, state.step, state.consumed_samples
        )
        return state

    def record_config(self, cfg) -> None:
        """``<save>/train_config.json``: the configuration in force, written (rank 0) once the
        resume checks accepted it."""
        if self.save_dir is None or not _rank0():
            return
        import json

        tmp = self.save_dir / ".train_config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(self.save_dir / "train_config.json")

    # -- save -------------------------------------------------------------------------------

    def should_save(self, state: TrainState, event: str) -> bool:
        """The save policy (module docstring)."""
        if event not in EVENTS:
            raise ValueError(f"unknown checkpoint event {event!r}; one of {EVENTS}")
        if self.save_dir is None or state.step == self.last_saved_step or event == "bad_stop":
            return False
        if event == "interval":
            interval = self.cfg.save_interval
            return bool(interval) and state.step % interval == 0 and state.bad_in_row == 0
        return True

    def maybe_save(self, state: TrainState, event: str) -> bool:
        """Save if the policy says so; returns whether it saved."""
        if not self.should_save(state, event):
            return False
        return self.save(state, event) is not None

    def save(self, state: TrainState, reason: str) -> Path | None:
        """Save ``state`` (collective); refuses (returns None, logs an error) when any weight is
        non-finite: no checkpoint is ever written from NaN / inf weights."""
        from mmcap.train.checkpoint import save_train_state, weights_are_finite

        if not weights_are_finite(self.chunks):
            log.error(
                "not saving step %d (%s): the model weights hold NaN / inf values; the last "
                "checkpoint stays 'latest'",
                state.step,
                reason,
            )
            return None
        t0 = time.perf_counter()
        path = save_train_state(
            self.save_dir,
            state.step,
            self.chunks,
            self.optimizer,
            self.scheduler,
            self.model_cfg,
            extra={k: v for k, v in state.state_dict().items() if k != "step"},
            extra_files=self.extra_files,
        )
        self.last_saved_step = state.step
        self._prune()
        log.info(
            "saved step %d (%s) to %s in %.1f s",
            state.step,
            reason,
            self.save_dir,
            time.perf_counter() - t0,
        )
        return path

    def _prune(self) -> None:
        keep = self.cfg.keep_last
        if keep is None or not _rank0():
            return
        steps = sorted(p for p in self.save_dir.glob("step_*") if p.is_dir() and "." not in p.name)
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# OptimizerParamScheduler state -> the configuration key that sets it
_SCHEDULE_KEYS = {
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "lr_warmup_steps": "optim.warmup_steps",
    "lr_decay_style": "optim.decay_style",
    "lr_decay_steps": "train_steps",
    "start_wd": "optim.weight_decay",
    "end_wd": "optim.weight_decay",
}


def check_schedule(ckpt: Path, scheduler, override: bool) -> None:
    """Refuse to resume with a schedule that differs from the checkpoint's unless ``override``
    (then the new one applies and is what ``train_config.json`` records): a silently ignored
    command line is never what is in force."""
    import json

    from mmcap.train.checkpoint import STATE_FILE

    saved = json.loads((ckpt / STATE_FILE).read_text()).get("scheduler", {})
    now = scheduler.state_dict()
    diffs = {}
    for name, key in _SCHEDULE_KEYS.items():
        if name in saved and saved[name] != now[name]:
            diffs.setdefault(key, f"{key} {now[name]!r} (now) vs {saved[name]!r} (checkpoint)")
    if not diffs:
        return
    if override:
        log.warning("optim.override_scheduler: applying the new schedule: %s", "; ".join(diffs.values()))
        return
    raise ConfigError(
        f"{', '.join(diffs)}: resuming {ckpt} with a schedule that differs from the "
        f"checkpoint's ({'; '.join(diffs.values())}); keep the checkpoint's values, or set "
        "optim.override_scheduler=true to apply the new ones from the resumed step on"
    )


def decide_resume(cfg: CheckpointConfig) -> Path | None:
    """:func:`resolve_resume` on rank 0 (which verifies the checkpoint), the same answer (or
    error) on every rank (collective). With ``resume: none`` and ``overwrite``, rank 0 clears
    the run directory first."""
    choice: list = [None]
    if _rank0():
        try:
            choice = [("ok", resolve_resume(cfg))]
            if choice[0][1] is None and cfg.overwrite and cfg.save:
                _clear_run(Path(cfg.save))
        except (ConfigError, CheckpointError) as e:
            choice = [("error", e)]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    kind, value = choice[0]
    if kind == "error":
        raise value
    return value


def _clear_run(root: Path) -> None:
    """Remove a run's checkpoints, pointer, metrics and TensorBoard logs (overwrite)."""
    for p in list(root.glob("step_*")) + [root / "tensorboard"]:
        shutil.rmtree(p, ignore_errors=True)
    for name in ("latest", "metrics.jsonl", "train_config.json"):
        (root / name).unlink(missing_ok=True)
    log.warning("checkpoint.overwrite: cleared the previous run in %s", root)


def resolve_load(path: str) -> Path:
    """``checkpoint.load``: a model / training checkpoint, or a run directory (its newest usable
    checkpoint, as ``--resume`` resolves it)."""
    from mmcap.checkpoint.dist import CONFIG_FILE
    from mmcap.train.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    raise ConfigError(
        f"checkpoint.load: {p} is not an mmcap checkpoint (no {CONFIG_FILE}) nor a run directory "
        "with checkpoints"
    )


def resolve_resume(cfg: CheckpointConfig) -> Path | None:
    """The checkpoint ``cfg.resume`` names: "auto" = the newest usable checkpoint of ``save``
    (:func:`mmcap.train.checkpoint.latest_checkpoint`), "none" = a fresh run (refused when
    ``save`` already holds a run's checkpoints, unless ``overwrite``), else a step directory
    (validated) or a run directory (its newest usable checkpoint)."""
    from mmcap.train.checkpoint import STATE_FILE, latest_checkpoint, validate_checkpoint

    r = cfg.resume
    verify = cfg.verify
    if r in (None, "none", "no", False):
        if cfg.save and not cfg.overwrite and any(Path(cfg.save).glob("step_*")):
            raise ConfigError(
                f"checkpoint.resume: none, but checkpoint.save={cfg.save} already holds a run's "
                "checkpoints; continue it (--resume auto), choose another checkpoint.save, or "
                "set checkpoint.overwrite=true to clear it"
            )
        return None
    if r == "auto":
        return latest_checkpoint(cfg.save, verify) if cfg.save else None
    path = Path(r)
    if (path / STATE_FILE).is_file():
        return validate_checkpoint(path, verify)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {path} does not exist")
    latest = latest_checkpoint(path, verify)
    if latest is None:
        raise ConfigError(f"checkpoint.resume: {path} is not a training checkpoint or run directory")
    return latest
