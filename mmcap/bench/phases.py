"""Per-phase forward timing of a training step through module hooks.

Phases of one model chunk (summed over the step's micro-batches):

- ``vision``: the vision tower's forward (frozen: it has no backward);
- ``encoder``: the BART encoder's forward;
- ``decoder.embedding``: decoder start to the first layer (embedding lookup, positions);
- ``decoder.layers``: first decoder layer start to last decoder layer end;
- ``loss``: last decoder layer end to decoder end (final norm, LM head, cross-entropy; on the
  last pipeline stage only);
- ``optimizer``: megatron-core's ``optimizer.step()`` (grad-norm, clipping, AdamW, the
  distributed optimizer's parameter all-gather);
- ``backward+other``: the rest of the step (every backward, the DP gradient reduce, pipeline
  communication, the loss all-reduce), i.e. step time minus all of the above.

On CUDA each mark is a CUDA event on the current stream (no synchronisation inside the step;
:meth:`PhaseTimer.end_step` synchronises once); elsewhere it is ``time.perf_counter``. With
activation recompute the recomputed forwards run again during backward and are counted here
as forward (benchmark without recompute for a clean split).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

__all__ = ["PHASES", "PhaseTimer"]

PHASES = (
    "vision",
    "encoder",
    "decoder.embedding",
    "decoder.layers",
    "loss",
    "optimizer",
    "backward+other",
)


class _Clock:
    """A mark: a recorded CUDA event, or a perf_counter reading."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


class PhaseTimer:
    """Collects per-phase seconds of each step over the given model chunks and optimizer.

    Args:
        chunks: the (DDP-wrapped or bare) :class:`mmcap.model.captioner.CaptioningModel`
            chunks of this rank.
        optimizer: the optimizer whose ``step`` is timed (its bound method is wrapped while
            the timer is attached).
        cuda: use CUDA events (default: whether CUDA is available).
    """

    def __init__(self, chunks, optimizer, cuda: bool | None = None):
        self.clock = _Clock(torch.cuda.is_available() if cuda is None else cuda)
        self._spans: list[tuple[str, object, object]] = []
        self._open: dict[tuple[int, str], object] = {}
        self._handles = []
        self.steps: list[dict[str, float]] = []
        for c in chunks:
            self._attach(getattr(c, "module", c))
        self._optimizer = optimizer
        self._optimizer_step = optimizer.step
        optimizer.step = self._timed_optimizer_step

    # -- hooks ------------------------------------------------------------------------------
    def _begin(self, key: str):
        def hook(module, args, kwargs=None):
            self._open[(id(module), key)] = self.clock.mark()

        return hook

    def _end(self, key: str, owner: torch.nn.Module | None = None):
        """A forward hook (or, with ``*rest`` empty, a pre-hook) closing ``key``'s span opened
        on ``owner`` (default: this module)."""

        def hook(module, args, *rest):
            start = self._open.pop((id(owner if owner is not None else module), key), None)
            if start is not None:
                self._spans.append((key, start, self.clock.mark()))

        return hook

    def _attach(self, model: torch.nn.Module) -> None:
        h = self._handles
        for name in ("vision", "encoder"):
            mod = getattr(model, name, None)
            if mod is not None:
                h.append(mod.register_forward_pre_hook(self._begin(name)))
                h.append(mod.register_forward_hook(self._end(name)))
        dec = model.decoder
        layers = list(dec.layers)
        h.append(dec.register_forward_pre_hook(self._begin("decoder.embedding")))
        if layers:
            first, last = layers[0], layers[-1]
            # decoder.embedding: decoder start -> first layer start (marks keyed on the decoder)
            h.append(first.register_forward_pre_hook(self._end("decoder.embedding", dec)))
            h.append(first.register_forward_pre_hook(self._begin("decoder.layers")))
            h.append(last.register_forward_hook(self._end("decoder.layers", first)))
            if getattr(dec, "post_process", True):  # the last stage computes the loss
                h.append(last.register_forward_hook(self._begin_on_output("loss", dec)))
                h.append(dec.register_forward_hook(self._end("loss")))

    def _begin_on_output(self, key: str, owner: torch.nn.Module):
        def hook(module, args, output):
            self._open[(id(owner), key)] = self.clock.mark()

        return hook

    def _timed_optimizer_step(self, *args, **kwargs):
        start = self.clock.mark()
        out = self._optimizer_step(*args, **kwargs)
        self._spans.append(("optimizer", start, self.clock.mark()))
        return out

    # -- per step ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._spans.clear()
        self._open.clear()

    def end_step(self, step_seconds: float) -> dict[str, float]:
        """Resolve this step's marks into seconds per phase (synchronises CUDA once)."""
        if self.clock.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for key, start, end in self._spans:
            out[key] += self.clock.seconds(start, end)
        phases = {k: out.get(k, 0.0) for k in PHASES[:-1]}
        phases["backward+other"] = max(step_seconds - sum(phases.values()), 0.0)
        self.steps.append(phases)
        return phases

    def mean(self) -> dict[str, float]:
        """Mean seconds per phase over the recorded steps."""
        if not self.steps:
            return {k: 0.0 for k in PHASES}
        return {k: sum(s[k] for s in self.steps) / len(self.steps) for k in PHASES}

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizer.step = self._optimizer_step
