"""Training metrics: JSON lines, TensorBoard, Weights & Biases and a console progress line.

One rank logs (the trainer picks it); every other rank holds ``MetricsLogger(enabled=False)``,
whose methods do nothing. Each :meth:`MetricsLogger.log` call writes

- one JSON line ``{"step": step, **metrics}`` to ``metrics_file`` (append mode, flushed and
  fsync'ed per line, so a killed run loses at most the line being written). Floats are written
  by ``json`` with ``repr``, so they read back bit-exactly; non-finite floats, which JSON has no
  literal for, are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (kept distinct,
  unlike ``null``) and :func:`read_metrics` turns them back into floats;
- every numeric metric as a TensorBoard scalar with the metric name as its tag
  (``loss/caption-en`` -> tag ``loss/caption-en``; TensorBoard stores float32);
- the same metrics to wandb when a project is set (imported lazily);
- a progress line at INFO on logger ``mmcap.train``, e.g.
  ``step 120/1000 (12.0%) | loss 3.2143 | lr 9.91e-05 | grad_norm 1.234 | 1234 tok/s |
  12.3 img/s | 45.6 TFLOP/s/GPU | MFU 4.6% | mem 12.3 GiB | eta 1h02m``, showing the fields
  present among :data:`CONSOLE_KEYS` (``mfu`` is a fraction, shown in percent); the ETA is
  ``(total_steps - step)`` times the mean ``step_time_s`` of the last :data:`ETA_WINDOW`
  logged steps (``step_time_s`` itself is not shown).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import numbers
import os
from typing import Any, Self

import torch

__all__ = [
    "CONSOLE_KEYS",
    "ETA_WINDOW",
    "MetricsLogger",
    "format_duration",
    "memory_stats",
    "read_metrics",
]

logger = logging.getLogger("mmcap.train")

# Metric keys the console line shows, in this order, and their format ("mfu" is a fraction).
_CONSOLE_FORMATS = {
    "loss": "loss {:.4f}",
    "lr": "lr {:.2e}",
    "grad_norm": "grad_norm {:.3f}",
    "tokens_per_s": "{:.0f} tok/s",
    "images_per_s": "{:.1f} img/s",
    "tflops_per_gpu": "{:.3g} TFLOP/s/GPU",  # 3 significant digits: tiny CPU runs too
    "mfu": "MFU {:.1%}",
    "mem_gib": "mem {:.1f} GiB",
    "data/useful_encoder": "useful tokens enc {:.0%}",
    "data/useful_decoder": "dec {:.0%}",
}
CONSOLE_KEYS = tuple(_CONSOLE_FORMATS)
ETA_WINDOW = 20  # logged step times averaged for the ETA: smooths noise, follows drift
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_GIB = 2**30
_warned_no_tensorboard = False


def _json_value(value: Any) -> Any:
    """A JSON-encodable value: tensors / numpy scalars unwrapped, non-finite floats as strings."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _number(value: Any) -> float | None:
    """A float for TensorBoard / wandb, or None for non-numeric values (and booleans)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, with ``"nan"``/``"inf"``/``"-inf"`` back as floats.

    Args:
        path: a ``metrics_file`` written by :class:`MetricsLogger`.
    """
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [
        {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in r.items()}
        for r in records
    ]


def format_duration(seconds: float) -> str:
    """``1h02m`` from one hour up, else ``12m05s`` / ``45s``."""
    s = round(max(seconds, 0.0))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def memory_stats() -> dict[str, float]:
    """Memory use in GiB.

    On CUDA (once initialised): ``mem_gib`` = peak allocated and ``mem_reserved_gib`` = peak
    reserved by the caching allocator since the last call (the peaks are reset). Otherwise
    ``mem_gib`` = the resident set size of this process (psutil).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = {
            "mem_gib": torch.cuda.max_memory_allocated() / _GIB,
            "mem_reserved_gib": torch.cuda.max_memory_reserved() / _GIB,
        }
        torch.cuda.reset_peak_memory_stats()
        return stats
    import psutil

    return {"mem_gib": psutil.Process().memory_info().rss / _GIB}


class MetricsLogger:
    """Writes one step's metrics to every configured sink (see the module docstring).

    Args:
        enabled: False on every rank but the logging one: nothing is opened or written.
        tensorboard_dir: TensorBoard log dir; None = no TensorBoard. If the tensorboard package
            is missing, a warning is logged once and training goes on without it.
        wandb_project / wandb_name / wandb_config: wandb run (project None = no wandb);
            needs ``pip install wandb``.
        metrics_file: JSON-lines file appended to (parent directories are created).
        total_steps: for the "step i/N (x%)" progress and the ETA.
        log_interval / peak_tflops / world_size: :meth:`log_step`'s console interval, per-GPU
            peak for MFU (None = no MFU) and the number of ranks sharing a step's FLOPs.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        tensorboard_dir: str | None = None,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        wandb_config: dict | None = None,
        metrics_file: str | None = None,
        total_steps: int | None = None,
        log_interval: int = 1,
        peak_tflops: float | None = None,
        world_size: int = 1,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval, self.peak_tflops, self.world_size = log_interval, peak_tflops, world_size
        self._step_times: collections.deque[float] = collections.deque(maxlen=ETA_WINDOW)
        self._file = None
        self._tb = None
        self._wandb_run = None
        if not enabled:
            return
        if wandb_project is not None:  # first: a missing package fails before files open
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"wandb_project={wandb_project!r} needs the wandb package: pip install "
                    "wandb (or leave wandb_project unset)"
                ) from e
            self._wandb_run = wandb.init(
                project=wandb_project, name=wandb_name, config=wandb_config or {}
            )
        if tensorboard_dir is not None:
            self._tb = _summary_writer(tensorboard_dir)
        if metrics_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            # Kept open across log() calls, closed by close().
            self._file = open(metrics_file, "a", encoding="utf-8")  # noqa: SIM115

    def log(
        self, step: int, metrics: dict[str, float], console: bool = True, tensorboard: bool = True
    ) -> None:
        """Record ``metrics`` of ``step`` in every sink.

        Args:
            step: the optimizer step (x axis everywhere).
            metrics: name -> value; numeric values go to TensorBoard / wandb, every value to
                the JSON line (it must be JSON-encodable after tensor unwrapping).
            console: also print the progress line.
            tensorboard: also write TensorBoard / wandb points (the JSON line is always written).
        """
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step': it is the step argument")
        if self._file is not None:
            record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        numeric = {k: x for k, v in metrics.items() if (x := _number(v)) is not None}
        if self._tb is not None and tensorboard:
            for k, x in numeric.items():
                self._tb.add_scalar(k, x, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None and tensorboard:
            self._wandb_run.log(numeric, step=step)
        step_time = numeric.get("step_time_s")
        if step_time is not None and math.isfinite(step_time):
            self._step_times.append(step_time)
        if console:
            logger.info(self.console_line(step, numeric))

    def log_eval(self, step: int, metrics: dict[str, float], source: str = "data.valid") -> None:
        """Validation metrics of ``step`` (``eval/<split>``, ``eval_key/<key>``,
        ``eval/samples``, ``eval/time_s``) in every sink, and their console lines: one per
        split, one per key, each value under its metric name."""
        if not self.enabled:
            return
        self.log(step, metrics, console=False)
        for line in self.eval_lines(step, metrics, source):
            logger.info(line)

    def eval_lines(self, step: int, metrics: dict[str, float], source: str = "data.valid") -> list[str]:
        """``eval step S/N | data.valid (n samples, t s) | eval/SC 2.1234 | ...`` and the same
        head with the ``eval_key/<key>`` values (the labels are the metric names)."""
        total = self.total_steps
        head = f"eval step {step}/{total}" if total else f"eval step {step}"
        what = []
        if "eval/samples" in metrics:
            what.append(f"{metrics['eval/samples']:.0f} samples")
        if "eval/time_s" in metrics:
            what.append(f"{metrics['eval/time_s']:.1f} s")
        head += f" | {source}" + (f" ({', '.join(what)})" if what else "")
        splits = [
            f"{k} {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("eval/") and k not in ("eval/samples", "eval/time_s")
        ]
        keys = [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_key/")]
        return [" | ".join([head, *part]) for part in (splits, keys) if part]

    def log_step(
        self,
        state,
        result,
        *,
        samples: float,
        images: float,
        flops: float,
        step_time: float,
        data_time: float,
        loss_scale: float | None = None,
        useful: tuple[float, float] | None = None,
    ) -> None:
        """The metrics of one training step (:class:`mmcap.train.state.TrainState` after the
        step, :class:`mmcap.train.step.StepResult`, the global batch's counts and times); the
        console line every ``log_interval`` steps, at step 1 and at the last step."""
        if not self.enabled:
            return
        from mmcap.train.flops import mfu

        tflops = flops / step_time / self.world_size / 1e12
        metrics = {
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / step_time,
            "samples_per_s": samples / step_time,
            "images_per_s": images / step_time,
            "tflops_per_gpu": tflops,
            "mfu": mfu(tflops * 1e12, self.peak_tflops),
            "step_time_s": step_time,
            "data_time_s": data_time,
            "consumed_samples": state.consumed_samples,
            "skipped_steps": state.skipped_steps,
            "data/decode_failures": state.decode_failures,
            "loss_scale": loss_scale,
            "data/useful_encoder": useful[0] if useful else None,
            "data/useful_decoder": useful[1] if useful else None,
            **{f"loss/{k}": v for k, v in result.key_loss.items()},
        }
        step = state.step
        console = step % self.log_interval == 0 or step == 1 or step == self.total_steps
        if console:
            metrics.update(memory_stats())
        # Every step to the JSON lines; TensorBoard / wandb at the console interval.
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.log(step, metrics, console=console, tensorboard=console)

    def console_line(self, step: int, metrics: dict[str, float]) -> str:
        """The progress line for ``step``: the :data:`CONSOLE_KEYS` present in ``metrics``, then
        the ETA (needs ``total_steps`` and a logged ``step_time_s``)."""
        total = self.total_steps
        parts = [f"train step {step}/{total} ({step / total:.1%})" if total else f"train step {step}"]
        parts += [fmt.format(metrics[k]) for k, fmt in _CONSOLE_FORMATS.items() if k in metrics]
        if total and self._step_times:
            mean = sum(self._step_times) / len(self._step_times)
            parts.append(f"eta {format_duration(max(total - step, 0) * mean)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer(log_dir: str):
    """torch's SummaryWriter, or None (warned once per process) without tensorboard."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            logger.warning(
                "tensorboard_dir=%s but TensorBoard is not usable (%s); logging without it "
                "(pip install tensorboard)",
                log_dir,
                e,
            )
        return None
    return SummaryWriter(log_dir=log_dir)
