"""The optimizer / schedule section of a training run's configuration (``optim.*``); part of
:class:`mmcap.train.config.TrainConfig`, which re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from mmcap.config import require

# How torch's AdamW runs when megatron-core falls back to it (optim.implementation).
ADAM_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


@dataclass
class OptimConfig:
    """AdamW + warmup + decay (SYSTEM.md recipes: LR 1e-4 pretraining / 5e-5 fine-tuning,
    cosine, 100 warmup steps, weight decay 0.01 / 0.05, grad clip 1.0).

    Args:
        lr / min_lr: peak and final learning rate.
        decay_style: "cosine", "linear" or "constant" (after warmup), megatron-core's
            OptimizerParamScheduler; decay runs to ``TrainConfig.train_steps``.
        clip_grad: global gradient-norm clip (0 = off).
        loss_scale: fp16 only: None = dynamic loss scaling (megatron-core DynamicGradScaler,
            starting at ``initial_loss_scale``), a number = constant scale.
        override_scheduler: when resuming with a schedule (lr, min_lr, warmup_steps,
            decay_style, weight_decay, train_steps) that differs from the checkpoint's, apply
            the new one from the resumed step on (Megatron-LM
            ``--override-opt_param-scheduler``); false = refuse to resume, naming the keys.
        weight_decay_rule: which parameters decay. "megatron" (default): all but biases and
            1-D parameters (norm weights, cross-attention gates). "official" (the paper's HF
            Trainer): all but biases and ``nn.LayerNorm`` weights, so Gemma RMSNorm weights
            and the gates decay too.
        loss_averaging: "global_token" (default): the per-token mean over the whole global
            batch, the same gradient for every layout. "per_microbatch" (official, HF Trainer
            with gradient accumulation): each micro-batch's token mean, averaged over
            micro-batches and data-parallel ranks (samples in short micro-batches weigh more).
        implementation: how torch's AdamW runs when megatron-core falls back to it (no
            Transformer Engine / apex, whose FusedAdam is always fused): "fused" (default),
            "foreach" or "for-loop" (:func:`mmcap.train.step.set_adam_implementation`).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 100
    decay_style: str = "cosine"
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**16
    override_scheduler: bool = False
    weight_decay_rule: str = "megatron"
    loss_averaging: str = "global_token"
    implementation: str = "fused"

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, lr]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(
            self.weight_decay_rule in ("megatron", "official"),
            "optim.weight_decay_rule",
            f"must be megatron or official, got {self.weight_decay_rule!r}",
        )
        require(
            self.loss_averaging in ("global_token", "per_microbatch"),
            "optim.loss_averaging",
            f"must be global_token or per_microbatch, got {self.loss_averaging!r}",
        )
        require(
            self.implementation in ADAM_IMPLEMENTATIONS,
            "optim.implementation",
            f"must be fused, foreach or for-loop, got {self.implementation!r}",
        )
        require(
            self.decay_style in ("cosine", "linear", "constant"),
            "optim.decay_style",
            f"must be cosine, linear or constant, got {self.decay_style!r}",
        )
