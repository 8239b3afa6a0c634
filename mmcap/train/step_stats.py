"""The training step's statistics in one reduction and ONE device->host copy.

A step needs, on every rank: the global loss (to skip a non-finite step before the optimizer
runs), the per-key losses, the global batch's counts (samples, images, FLOPs, useful tokens),
the decode failures, whether any rank saw a signal, and, with ``exit_duration_minutes``, the
elapsed time. :func:`reduce_step_stats` packs them into one float64 vector on the device,
all-reduces it ONCE over the world and reads it with ONE ``tolist()`` (on CUDA the step's one
host sync of mmcap's own; megatron-core's optimizer has its own found-inf / grad-norm reads).

Layout (:func:`layout`): ``[loss sum, target tokens, (loss sum, tokens) per key x K,
batch counts x 7, decode failures, signalled, loss-gradient check]``. Each rank contributes
only what it owns, so one SUM over the world gives what separate reductions over the DP, PP
and world groups gave:

- loss and per-key sums: the last pipeline stage's TP rank 0 of each replica (other stages
  hold no loss; TP ranks hold the same) -> the sum over DP, as the DP + PP all-reduces gave;
- batch counts (:class:`mmcap.train.data.StepCounter`, the same on every rank of a replica):
  the same one rank per replica -> the sum over DP;
- decode failures: every rank (first-stage ranks decode, each TP rank of a replica the same
  batch), divided by TP after the sum; signalled: every rank (> 0 = any);
- loss-gradient check: the device flag of the fused LM-head loss's forward-gradient strategy
  (:func:`mmcap.ops.softcap_ce.take_grad_check`: a per-token loss gradient that was not the
  same on every non-ignored token), every rank (> 0 = any);
- elapsed minutes: MAX, so it takes a second all-reduce (only with ``exit_duration_minutes``),
  read with the same copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmcap.data.prompts import ALL_KEYS
from mmcap.ops.softcap_ce import take_grad_check

NUM_COUNTS = 7  # StepCounter: samples, images, FLOPs, enc tokens, enc slots, dec tokens, dec slots


@dataclass
class HostStats:
    """This rank's host-side numbers of the step (all optional: a bare ``train_step`` has none).

    Args:
        counts: float64 [7] from :class:`mmcap.train.data.StepCounter` (host tensor).
        decode_failures: images of this rank's batch that failed to decode.
        signalled: this rank saw SIGTERM / SIGINT; a callable is asked at the reduction
            (after forward / backward), so a signal during the step counts for this step.
        start_time: ``time.time()`` at the run's start; the elapsed minutes (max over ranks)
            are measured at the reduction (after forward / backward). None = not needed.
    """

    counts: torch.Tensor | None = None
    decode_failures: int = 0
    signalled: bool | Callable[[], bool] = False
    start_time: float | None = None


@dataclass
class StepStats:
    """The reduced statistics, the same on every rank."""

    loss: float  # per-token mean CE of the global batch (nan without target tokens)
    tokens: int
    key_loss: dict[str, float]  # per task-language key present in the batch
    samples: float = 0.0
    images: float = 0.0
    flops: float = 0.0
    useful: tuple[float, float] = (0.0, 0.0)  # useful-token fractions (encoder, decoder)
    decode_failures: int = 0
    signalled: bool = False
    elapsed_minutes: float | None = None
    loss_grad_mismatch: bool = False  # see mmcap.ops.softcap_ce_fwdgrad


def layout() -> dict[str, slice]:
    k = 2 + 2 * len(ALL_KEYS)
    return {
        "loss": slice(0, 2),
        "key": slice(2, k),
        "counts": slice(k, k + NUM_COUNTS),
        "flags": slice(k + NUM_COUNTS, k + NUM_COUNTS + 3),
    }


def _replica_owner_and_tp() -> tuple[bool, int]:
    """(this rank adds the loss and the batch counts, TP size): the owner is the last pipeline
    stage's TP rank 0, one rank per replica."""
    from megatron.core import parallel_state as ps

    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if not dist.is_initialized():
        return last, 1
    tp = ps.get_tensor_model_parallel_world_size()
    return last and ps.get_tensor_model_parallel_rank() == 0, tp


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a sync: pinned + non_blocking on CUDA (a
    blocking host->device copy waits for every queued kernel)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def reduce_step_stats(
    losses: list[dict[str, torch.Tensor]], host: HostStats | None, device: torch.device
) -> StepStats:
    """Reduce a step's statistics (module docstring); collective when torch.distributed is up.

    Args:
        losses: the schedule's per-micro-batch logs on the last pipeline stage (``"lm loss"``
            [2], optionally ``"key loss"`` [K, 2], on ``device``); ignored elsewhere.
        host: this rank's host-side numbers, or None.
        device: where the reduction runs (the model's device: NCCL on CUDA, gloo on CPU).
    """
    host = host or HostStats()
    owner, tp = _replica_owner_and_tp()
    at = layout()
    k = at["key"].stop
    if owner and losses:  # float32 sums over micro-batches, then float64 (as before)
        lm = torch.stack([x["lm loss"] for x in losses]).sum(0).double()
        if "key loss" in losses[0]:
            key = torch.stack([x["key loss"] for x in losses]).sum(0).double().flatten()
        else:
            key = torch.zeros(k - 2, dtype=torch.float64, device=lm.device)
        loss_part = torch.cat([lm, key])
    else:
        loss_part = torch.zeros(k, dtype=torch.float64, device=device)  # no loss on this rank
    host_part = torch.zeros(NUM_COUNTS + 3, dtype=torch.float64)
    if owner and host.counts is not None:
        host_part[:NUM_COUNTS] = host.counts
    signalled = host.signalled() if callable(host.signalled) else host.signalled
    host_part[NUM_COUNTS : NUM_COUNTS + 2] = torch.tensor(
        [float(host.decode_failures), float(signalled)]
    )
    stats = torch.cat([loss_part, _to_device(host_part, device)])
    grad_check = take_grad_check(device)  # a device flag, or None: no read here
    if grad_check is not None:
        stats[-1] += grad_check.to(stats.dtype)
    elapsed = None
    if host.start_time is not None:
        minutes = torch.tensor([(time.time() - host.start_time) / 60.0], dtype=torch.float64)
        elapsed = _to_device(minutes, device)
    if dist.is_initialized():
        dist.all_reduce(stats)  # one SUM over the world (asynchronous on NCCL)
        if elapsed is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    # The one device->host copy of the step (a sync on CUDA).
    v = (stats if elapsed is None else torch.cat([stats, elapsed])).tolist()
    return _unpack(v, at, tp, elapsed is not None)


def _unpack(v: list[float], at: dict[str, slice], tp: int, has_elapsed: bool) -> StepStats:
    loss_sum, tokens = v[at["loss"]]
    per_key = v[at["key"]]
    samples, images, flops, enc, enc_slots, dec, dec_slots = v[at["counts"]]
    failures, signalled, grad_mismatch = v[at["flags"]]
    return StepStats(
        loss=loss_sum / tokens if tokens else float("nan"),
        tokens=int(tokens),
        key_loss={
            k: per_key[2 * i] / per_key[2 * i + 1]
            for i, k in enumerate(ALL_KEYS)
            if per_key[2 * i + 1] > 0
        },
        samples=samples,
        images=images,
        flops=flops,
        useful=(enc / max(enc_slots, 1.0), dec / max(dec_slots, 1.0)),
        decode_failures=int(failures) // tp,
        signalled=signalled > 0,
        loss_grad_mismatch=grad_mismatch > 0,
        elapsed_minutes=v[-1] if has_elapsed else None,
    )
