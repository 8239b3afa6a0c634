"""One optimizer step of the captioning model on megatron-core's engine (trainer groundwork).

- Model chunks wrapped in megatron-core ``DistributedDataParallel`` (frozen parameters are not
  in its buffers, so the optimizer never sees them) and stepped by megatron-core's optimizer
  (``get_megatron_optimizer``: distributed optimizer = ZeRO-1, grad clipping, loss scaling).
- megatron-core's schedule (no pipelining, 1F1B or interleaved) through
  :func:`mmcap.model.stage_io.run_schedule`, the one call train and eval share.
- The step's statistics (loss, per-key sums, the loop's batch counts and flags) in one
  all-reduce and one device->host copy (:mod:`mmcap.train.step_stats`).
- Per-token loss: ``calculate_per_token_loss`` makes megatron-core divide the summed loss by the
  number of target tokens of the whole global batch (all micro-batches, all DP ranks), so every
  layout computes the same gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from mmcap.config import IGNORE_INDEX
from mmcap.data.prompts import ALL_KEYS
from mmcap.model.stage_io import MicroBatch, run_schedule
from mmcap.parallel import cuda_factories_on_cpu
from mmcap.parallel.multi_tensor import install_multi_tensor_fallbacks
from mmcap.train.data import current_device
from mmcap.train.optim_config import ADAM_IMPLEMENTATIONS
from mmcap.train.step_stats import HostStats, StepStats, reduce_step_stats


def wrap_model(
    chunks: list[torch.nn.Module],
    grad_reduce_in_fp32: bool = True,
    use_distributed_optimizer: bool = True,
) -> list[DistributedDataParallel]:
    for m in chunks:
        # Must be set before DDP is built: DDP then skips its 1/DP gradient scaling, and the
        # schedule divides by the global token count instead.
        m.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m) for m in chunks
    ]


def official_weight_decay_overrides(ddp_chunks) -> dict:
    """megatron-core ``config_overrides`` for the official rule (HF Trainer's
    ``get_decay_parameter_names``): no decay for biases and ``nn.LayerNorm`` weights only."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    layernorm = {
        id(p)
        for c in ddp_chunks
        for m in c.modules()
        if isinstance(m, torch.nn.LayerNorm)
        for p in m.parameters(recurse=False)
    }
    no_decay = ParamWithNamePredicate(
        name="official_no_decay", fn=lambda p, name: "bias" in name or id(p) in layernorm
    )
    return {ParamKey(with_name_predicate=no_decay): {"wd_mult": 0.0}}  # a ParamGroupOverride


def set_adam_implementation(optimizer, implementation: str) -> None:
    """Choose how torch's AdamW runs inside megatron-core's optimizer (torchtitan's
    ``optimizer.implementation``):

    - "fused": torch's fused AdamW kernel, the whole update in one multi-tensor pass and no
      temporaries the size of the optimizer state;
    - "foreach": torch's default on CUDA, a few multi-tensor kernels per update term, each
      allocating its result;
    - "for-loop": one kernel per parameter and term (torch's default on CPU).

    megatron-core builds torch's AdamW without choosing, i.e. foreach on CUDA and for-loop on
    CPU. Must run before the first step (the fused kernel keeps Adam's ``step`` counters on the
    parameters' device). With Transformer Engine or apex installed megatron-core uses their
    FusedAdam, which is always fused: nothing is changed then (:func:`describe_optimizer`
    says what runs).

    Args:
        optimizer: megatron-core's optimizer (a ChainedOptimizer or one optimizer).
        implementation: one of :data:`ADAM_IMPLEMENTATIONS`.

    Raises:
        ValueError: an unknown implementation, or an optimizer that has stepped already.
    """
    if implementation not in ADAM_IMPLEMENTATIONS:
        raise ValueError(
            f"Adam implementation must be one of {ADAM_IMPLEMENTATIONS}, got {implementation!r}"
        )
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # TE / apex FusedAdam, SGD: left as built
        if any(len(state) for state in inner.state.values()):
            raise ValueError("set the Adam implementation before the optimizer's first step")
        for group in [*inner.param_groups, inner.defaults]:
            group["fused"] = implementation == "fused"
            group["foreach"] = implementation == "foreach"
        # As torch's constructor does for fused=True (the kernel takes a grad scaler's state).
        inner._step_supports_amp_scaling = implementation == "fused"


def describe_optimizer(optimizer) -> str:
    """What steps the parameters, e.g. "torch AdamW fused" or "FusedAdam" (TE / apex);
    "torch AdamW default" is torch's own choice (foreach on CUDA, for-loop on CPU)."""
    names = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        name = type(inner).__name__
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            group = inner.param_groups[0] if inner.param_groups else inner.defaults
            fused, foreach = group.get("fused"), group.get("foreach")
            how = "fused" if fused else "foreach" if foreach else "for-loop"
            name = f"torch {name} " + ("default" if fused is None and foreach is None else how)
        if name not in names:
            names.append(name)
    return " + ".join(names)


def build_optimizer(
    ddp_chunks,
    optimizer_config: OptimizerConfig,
    weight_decay_rule: str = "megatron",
    implementation: str = "fused",
):
    """megatron-core optimizer; wires its loss scaling and grad finalisation into the config.

    Without apex / Transformer Engine, megatron-core's grad-norm and scale fallbacks are
    replaced by sync-free ``_foreach`` ones (:mod:`mmcap.parallel.multi_tensor`) and torch's
    AdamW runs as ``implementation`` (:func:`set_adam_implementation`).

    Args:
        weight_decay_rule: "megatron" (megatron-core's default: no decay for biases and 1-D
            parameters) or "official" (:func:`official_weight_decay_overrides`).
        implementation: "fused" (default), "foreach" or "for-loop" (``optim.implementation``).
    """
    overrides = None
    if weight_decay_rule == "official":
        overrides = official_weight_decay_overrides(ddp_chunks)
    elif weight_decay_rule != "megatron":
        raise ValueError(f"weight_decay_rule must be megatron or official, got {weight_decay_rule!r}")
    install_multi_tensor_fallbacks()
    with cuda_factories_on_cpu():
        opt = get_megatron_optimizer(optimizer_config, ddp_chunks, config_overrides=overrides)
    set_adam_implementation(opt, implementation)
    cfg = ddp_chunks[0].config
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    cfg.no_sync_func = (
        [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    )
    return opt


def key_loss(mb: MicroBatch, output: torch.Tensor):
    """Loss function of a training micro-batch (:data:`mmcap.model.stage_io.LossFn`): (summed
    loss, target tokens, logging) as megatron-core's per-token loss expects.

    Logging: "lm loss" = [summed CE, tokens]; "key loss" = [num keys, 2] the same per
    task-language key (per-token mean per key = column 0 / column 1); ``mb.key`` is per sample
    [b], or per token [b, s] in packed rows."""
    mask = (mb.labels != IGNORE_INDEX).float()
    per_token = output.float() * mask
    loss = per_token.sum()
    tokens = mask.sum().to(torch.int)
    logs = {"lm loss": torch.stack([loss.detach(), tokens.float()])}
    if mb.key is not None:
        if mb.key.dim() == 2:  # packed rows: a key per token
            per_item = torch.stack([per_token.detach().flatten(), mask.flatten()], dim=1)
            keys = mb.key.flatten()
        else:
            per_item = torch.stack([per_token.detach().sum(1), mask.sum(1)], dim=1)  # [b, 2]
            keys = mb.key
        by_key = per_item.new_zeros(len(ALL_KEYS), 2)
        logs["key loss"] = by_key.index_add_(0, keys, per_item)  # keys are on the device
    return loss, tokens, logs


def microbatch_mean_loss(mb: MicroBatch, output: torch.Tensor):
    """The official averaging (``optim.loss_averaging=per_microbatch``): this micro-batch's
    token-mean CE, counted as ONE unit, so megatron-core's per-token division averages the
    micro-batch means over micro-batches and DP ranks (HF Trainer's gradient accumulation).
    Logging is the same as :func:`key_loss` (token sums)."""
    loss, tokens, logs = key_loss(mb, output)
    return loss / tokens.clamp(min=1), torch.ones_like(tokens), logs


@dataclass
class StepResult:
    """One optimizer step, the same on every rank.

    Args:
        loss: per-token mean CE of the global batch.
        key_loss: per task-language key, the per-token mean CE.
        tokens: target tokens of the global batch.
        grad_norm: None when the update was skipped.
        skipped: None, or why the update was skipped ("non-finite loss" / "non-finite
            gradients").
        lr: the learning rate this step used.
        stats: everything the step reduced (loss, counts, flags; :class:`StepStats`).
    """

    loss: float
    key_loss: dict[str, float]
    tokens: int
    lr: float
    grad_norm: float | None = None
    skipped: str | None = None
    stats: StepStats | None = None

    @property
    def update_successful(self) -> bool:
        return self.skipped is None


def train_step(
    ddp_chunks,
    optimizer,
    microbatches: list[MicroBatch],
    *,
    encoder_hidden: int,
    scheduler=None,
    loss_averaging: str = "global_token",
    host_stats: HostStats | None = None,
) -> StepResult:
    """Forward + backward over ``microbatches`` (this DP rank's share), one optimizer step and,
    when the update was applied, one LR-scheduler step (Megatron-LM: skipped steps do not
    advance the schedule).

    A non-finite global loss skips the update; so does a loss scaler that finds non-finite
    gradients (megatron-core's optimizer: fp16, or bf16 / fp32 with ``loss_scale`` set).

    ``host_stats``: this rank's batch counts / flags, reduced together with the loss
    (:func:`mmcap.train.step_stats.reduce_step_stats`); the result is ``StepResult.stats``.
    """
    for c in ddp_chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    losses = run_schedule(
        ddp_chunks,
        microbatches,
        num_microbatches=len(microbatches),
        shape_of=microbatches[0],
        loss_fn=microbatch_mean_loss if loss_averaging == "per_microbatch" else key_loss,
        forward_only=False,
        encoder_hidden=encoder_hidden,
    )
    # The global loss (and per-key sums, and the loop's batch counts / flags) on EVERY rank, so
    # all ranks agree on skipping: one all-reduce, one device->host copy (step_stats).
    stats = reduce_step_stats(losses, host_stats, current_device())
    if stats.loss_grad_mismatch:  # before the optimizer: no update from a wrong dW
        from mmcap.ops.softcap_ce_fwdgrad import GRAD_CHECK_MESSAGE

        raise RuntimeError(GRAD_CHECK_MESSAGE)
    result = StepResult(
        loss=stats.loss, key_loss=stats.key_loss, tokens=stats.tokens, lr=lr, stats=stats
    )
    if not math.isfinite(stats.loss):
        # NaN / inf loss: no update (the gradient buffers are zeroed at the next step).
        result.skipped = "non-finite loss"
        return result
    with cuda_factories_on_cpu():
        ok, grad_norm, _ = optimizer.step()
    result.grad_norm = grad_norm
    if not ok:  # the loss scaler found inf / nan gradients
        result.skipped = "non-finite gradients"
    elif scheduler is not None:
        scheduler.step(increment=1)
    return result
