"""The progress of a training run (:class:`TrainState`): what a checkpoint stores besides the
model, optimizer and scheduler, and the counters the loop decides on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Args:
    step: optimizer steps taken (skipped steps included: they consumed their batch).
    consumed_samples: samples of all steps so far.
    skipped_steps: steps whose update was skipped (non-finite loss / gradients, fp16
        overflow).
    bad_in_row: consecutive steps with a non-finite loss or gradients (not fp16 overflow
        calibration); ``max_bad_steps`` of them stop the run.
    decode_failures: images that failed to decode and were replaced by a blank image.
    sampler: the data state after the last consumed batch (exact resume).
    """

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    decode_failures: int = 0
    sampler: dict = field(default_factory=dict)

    def record(self, *, samples: int, sampler: dict, skipped: str | None, overflow: bool) -> None:
        """Account for one finished step.

        Args:
            skipped: why the update was skipped (None = applied).
            overflow: the skip was fp16 loss-scale calibration (expected, not a bad step).
        """
        self.step += 1
        self.consumed_samples += samples
        self.sampler = sampler
        if skipped is None:
            self.bad_in_row = 0
            return
        self.skipped_steps += 1
        if not overflow:
            self.bad_in_row += 1

    def state_dict(self) -> dict:
        """The ``train_state.json`` fields (besides layout and scheduler)."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "decode_failures": self.decode_failures,
            "sampler": self.sampler,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        return cls(
            step=int(state["step"]),
            consumed_samples=int(state["consumed_samples"]),
            skipped_steps=int(state.get("skipped_steps", 0)),
            decode_failures=int(state.get("decode_failures", 0)),
            sampler=state["sampler"],
        )
