"""Typed configuration of a training run (the dataclasses; :mod:`mmcap.train.overrides` builds
one from a preset, a YAML file and key=value overrides, torchtitan / Megatron-LM style)::

    torchrun --nproc-per-node 8 -m mmcap.train --preset florence-gemma-2-xlarge \\
        --config examples/pretrain/florence-gemma-2-xlarge.yaml \\
        parallel.tensor_parallel=4 optim.lr=5e-5 train_steps=200

Precedence: dataclass defaults < ``--config`` YAML (recipes in ``examples/``) <
``--preset`` < ``key=value`` (dotted paths, values parsed as YAML: ``3``, ``1e-4``, ``true``, ``null``,
``[a, b]``). Unknown keys are errors that name the key. ``model.*`` keys override fields of the
preset's :class:`mmcap.config.ModelConfig` (``model.vision.image_size=768``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmcap.config import (
    DEFAULT_SEED,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    require,
)
from mmcap.config.presets import get_preset
from mmcap.config.serialize import model_config_from_dict, model_config_to_dict
from mmcap.data.config import BatchConfig, ImageConfig, SamplerConfig
from mmcap.model.compile import CompileConfig
from mmcap.model.te import resolve_transformer_impl
from mmcap.train.optim_config import OptimConfig

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "OptimConfig",
    "TrainConfig",
]


# Fields of the data package's configs that the run sets (global batch, layout, seed, model
# image size, device): a user value would be silently replaced, so it is an error instead.
_RUN_FIELDS = {
    "sampler": {
        "global_batch_size": "global_batch_size",
        "data_parallel_size": "the launch (world size / (TP x PP))",
        "data_parallel_rank": "the launch",
        "seed": "seed",
    },
    "image": {"size": "model.vision.image_size", "device": "the launch (current device)"},
}
# Keys of earlier releases (flat data section) -> where they live now.
_MOVED = {
    "balancing": "sampler.balancing",
    "target": "sampler.target",
    "weights": "sampler.dataset_weights",
    "max_prompt_tokens": "batch.max_prompt_tokens",
    "max_target_tokens": "batch.max_target_tokens",
    "pad_multiple": "batch.pad_multiple",
    "image_backend": "image.backend",
}


@dataclass
class DataConfig:
    """Training / validation data (indexed datasets made by ``tools/preprocess_data.py``).

    The sections are the data package's own dataclasses (one source of defaults and
    validation): ``data.sampler`` (:class:`mmcap.data.config.SamplerConfig`: ``balancing``,
    ``target``, ``dataset_weights``), ``data.batch`` (:class:`mmcap.data.config.BatchConfig`:
    ``max_prompt_tokens`` / ``max_target_tokens`` crop lengths, paper 128 / 128, padding) and
    ``data.image`` (:class:`mmcap.data.config.ImageConfig`: ``backend``, normalisation). The
    run fills in the sampler's batch size, layout and seed and the image size.

    Args:
        train: dataset directories, blended by ``sampler.dataset_weights`` (None = equal).
        valid: a held-out dataset for periodic CE validation (``EvalConfig``), or None.
        num_workers: PIL decoding processes per rank.
        features: per train dataset, a frozen-vision feature cache directory
            (``tools/cache_vision_features.py``) used instead of decoding images.
        packing: sequence packing (:mod:`mmcap.data.packing`): the step's samples packed
            several to a fixed-length row on both sides, attention kept within each sample;
            ``micro_batch_size`` then counts ROWS and the number of micro-batches per step
            follows from how the samples pack. ``global_batch_size`` still counts samples.
        packing_encoder_length / packing_decoder_length: row lengths; null = automatic rows
            that hold ~4 samples of the training data's mean lengths (under the sampling
            target) in its encoder : decoder ratio, and at least one longest sample (image
            tokens + ``batch.max_prompt_tokens`` / ``batch.max_target_tokens``). Given values
            must be at least those; the decoder one a multiple of the padding multiple.
    """

    train: list[str] = field(default_factory=list)
    valid: str | None = None
    features: list[str] | None = None
    num_workers: int = 2
    packing: bool = False
    packing_encoder_length: int | None = None
    packing_decoder_length: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        weights = self.sampler.dataset_weights
        if weights is not None:
            require(
                len(weights) == len(self.train),
                "data.sampler.dataset_weights",
                f"{len(weights)} weights for {len(self.train)} train datasets",
            )
        if self.features is not None:
            require(
                len(self.features) == len(self.train),
                "data.features",
                f"{len(self.features)} feature caches for {len(self.train)} train datasets",
            )
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        for name in ("packing_encoder_length", "packing_decoder_length"):
            v = getattr(self, name)
            require(v is None or v >= 1, f"data.{name}", "must be >= 1 (or null: the default)")
            require(
                v is None or self.packing, f"data.{name}", "only used with data.packing=true"
            )

    @staticmethod
    def check_keys(tree: dict) -> None:
        """Errors for keys the run sets itself and for keys that moved (raw ``data`` dict)."""
        for key in tree:
            if key in _MOVED:
                raise ConfigError(
                    f"data.{key}: unknown key; it is data.{_MOVED[key]} (e.g. "
                    f"data.{_MOVED[key]}=...)"
                )
        for section, fields in _RUN_FIELDS.items():
            given = tree.get(section)
            for name in given if isinstance(given, dict) else ():
                if name in fields:
                    raise ConfigError(
                        f"data.{section}.{name}: set by the run from {fields[name]}; remove it"
                    )


@dataclass
class CheckpointConfig:
    """Args:
    save: directory of the run's checkpoints (``step_<N>/`` + ``latest``); None = never save.
    save_interval: save every N steps (0 = only at the end / on SIGTERM).
    resume: "auto" = continue from ``save``/latest when it exists, "none" = start fresh, or a
        checkpoint directory to continue from.
    load: initial MODEL weights for a fresh run (a ``tools/convert_from_hf.py`` output or a
        pretraining checkpoint for fine-tuning); optimizer and step start fresh. Ignored when
        resuming.
    keep_last: delete older ``step_<N>`` directories beyond this many (None = keep all).
    verify: verify the checksums of every file of the checkpoint a run resumes from (a
        damaged newest checkpoint falls back to the previous one); false = sizes only.
    overwrite: with ``resume: none``, clear an existing run in ``save`` (its checkpoints,
        metrics and TensorBoard logs) instead of refusing to start over it.
    """

    save: str | None = None
    save_interval: int = 1000
    resume: str = "auto"
    load: str | None = None
    keep_last: int | None = None
    verify: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(self.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
        require(
            self.keep_last is None or self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"
        )


@dataclass
class LoggingConfig:
    """Args:
    log_interval: steps between console lines / TensorBoard points.
    tensorboard_dir: default ``<checkpoint.save>/tensorboard`` ("" = off).
    wandb_project / wandb_name: log to Weights & Biases when a project is set (needs the
        wandb package: checked when the configuration is parsed).
    metrics_file: JSON lines of every step's metrics (default ``<save>/metrics.jsonl``).
    peak_tflops: per-GPU peak for MFU; None = from the device name (H100/H200: 989 bf16).
    """

    log_interval: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_name: str | None = None
    metrics_file: str | None = None
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        require(self.log_interval >= 1, "logging.log_interval", "must be >= 1")
        if self.wandb_project == "":
            self.wandb_project = None  # ``logging.wandb_project=`` = off
        if self.wandb_project is not None:
            import importlib.util

            require(
                importlib.util.find_spec("wandb") is not None,
                "logging.wandb_project",
                f"set to {self.wandb_project!r} but the wandb package is not installed; "
                "pip install wandb, or unset it (logging.wandb_project=null)",
            )
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "logging.peak_tflops",
            "must be > 0 (or null: from the device name)",
        )


@dataclass
class EvalConfig:
    """Periodic teacher-forced CE validation on ``data.valid`` (mmcap.eval, the same code as
    ``tools/eval_loss.py``).

    Args:
        interval: every N steps (0 = off); also after the last step when > 0.
        max_samples: evaluate the first N entries of the valid set (None = all).
        micro_batch_size: entries per evaluation micro-batch.
    """

    interval: int = 0
    max_samples: int | None = None
    micro_batch_size: int = 8

    def __post_init__(self) -> None:
        require(self.interval >= 0, "eval.interval", "must be >= 0 (0 = off)")
        require(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")
        require(
            self.max_samples is None or self.max_samples >= 1, "eval.max_samples", "must be >= 1"
        )


@dataclass
class TrainConfig:
    """One training run.

    Args:
        preset: model preset (``mmcap.config.presets``).
        model: overrides of the preset's ModelConfig fields, nested dicts by section.
        train_steps: optimizer steps of the whole run (the LR schedule spans them).
        global_batch_size / micro_batch_size: samples per step over all DP ranks / per
            forward; micro-batches per step = global / (micro x DP).
        recompute: activation recompute: None, "selective" (attention core of every layer) or
            "full" (every decoder / encoder layer).
        max_bad_steps: K: stop after K steps in a row with a non-finite loss or gradient.
        exit_interval: checkpoint and exit (code 0) when the step is a multiple of this
            (Megatron-LM ``--exit-interval``; e.g. to split a run into scheduled jobs).
        exit_duration_minutes: checkpoint and exit once the run has lasted this long.
        seed: model init, dropout, data order.
        compile: ``torch.compile`` of the transformer layers (:mod:`mmcap.model.compile`).
    """

    preset: str = "debug-gemma"
    model: dict = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    train_steps: int = 1000
    global_batch_size: int = 1024
    micro_batch_size: int = 8
    recompute: str | None = None
    max_bad_steps: int = 5
    exit_interval: int | None = None
    exit_duration_minutes: float | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        require(self.train_steps >= 1, "train_steps", "must be >= 1")
        require(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        require(
            self.recompute in (None, "selective", "full"),
            "recompute",
            f"must be null, selective or full, got {self.recompute!r}",
        )
        require(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        require(
            self.exit_interval is None or self.exit_interval >= 1,
            "exit_interval",
            "must be >= 1 (or null: off)",
        )
        require(
            self.exit_duration_minutes is None or self.exit_duration_minutes > 0,
            "exit_duration_minutes",
            "must be > 0 (or null: off)",
        )
        require(
            not (self.data.packing and self.optim.loss_averaging == "per_microbatch"),
            "data.packing",
            "cannot be combined with optim.loss_averaging=per_microbatch: packing changes which "
            "samples share a micro-batch, hence the per-micro-batch means (use global_token)",
        )
        require(
            not (self.precision.fp8 and self.recompute == "full"),
            "recompute",
            "full recompute re-runs the layers outside Transformer Engine's FP8 autocast; with "
            "precision.fp8 use recompute=selective (attention core only) or none",
        )
        # Transformer Engine needed (transformer_impl / fp8) but missing: say what to install.
        resolve_transformer_impl(self.precision)
        # The sampler's run fields come from the run (DataConfig.check_keys rejects user values).
        self.data.sampler = dataclasses.replace(
            self.data.sampler, global_batch_size=self.global_batch_size, seed=self.seed
        )

    def model_config(self) -> ModelConfig:
        """The preset with ``model`` overrides applied (validated)."""
        base = model_config_to_dict(get_preset(self.preset))
        merged = _merge(base, self.model, "model")
        return model_config_from_dict(merged, where="model")

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per step and DP rank; with ``data.packing`` it varies per step (the
        rows the local batch packs into), and this checks only that DP divides the batch."""
        if self.data.packing:
            require(
                self.global_batch_size % dp == 0,
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of the data-parallel size {dp}",
            )
            return 0
        per_rank, rest = divmod(self.global_batch_size, dp * self.micro_batch_size)
        require(
            rest == 0 and per_rank >= 1,
            "global_batch_size",
            f"{self.global_batch_size} is not a multiple of micro_batch_size "
            f"{self.micro_batch_size} x data-parallel size {dp}",
        )
        return per_rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"{where}.{k}: unknown key; known: {sorted(base)}")
        if isinstance(base[k], dict) and not isinstance(v, dict):
            raise ConfigError(f"{where}.{k}: is a section; set its keys ({where}.{k}.KEY=...)")
        out[k] = _merge(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) else v
    return out
