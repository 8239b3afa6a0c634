"""Typed configuration of the data pipeline: preprocessing, sampling, batches, images.

One dataclass per component (STYLE.md 3), validated in ``__post_init__`` with a
:class:`mmcap.config.ConfigError` that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmcap.config.constants import DEFAULT_SEED, IGNORE_INDEX
from mmcap.config.errors import require
from mmcap.data.prompts import ALL_KEYS, FINETUNING_KEYS, PRETRAINING_KEYS


def _positive_int(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(
            isinstance(v, int) and not isinstance(v, bool) and v > 0,
            f"{type(obj).__name__}.{n}",
            f"must be a positive integer, got {v!r}",
        )


@dataclass
class PreprocessConfig:
    """Limits and resources of ``tools/preprocess_data.py``.

    Args:
        max_prompt_tokens: entries whose prompt needs more BART tokens are skipped as
            ``too_long`` (1024 = BART's position table; training crops to 128 anyway, and a
            translation whose source would be cropped no longer matches its target).
        max_target_tokens: same for Gemma target tokens (official truncation length 1024).
        max_text_chars: texts longer than this are skipped before tokenizing (guards the
            tokenizers against pathological records).
        workers: processes; each input file is one unit of work.
        verify_images: fully decode every JPEG (at 1/8 scale) to catch corrupt files; off,
            only the JPEG signature and header are checked.
        long_entries: "reject" (mmcap default) skips an entry over ``max_prompt_tokens`` /
            ``max_target_tokens`` as ``too_long``; "keep" (official) stores it whole, to be
            cropped when batched. Counted in the manifest (``counts.long_entries``) either way.
        truncated_images: "reject" (mmcap default) skips a record whose JPEG is truncated as
            ``bad_image``; "load" (official, PIL ``LOAD_TRUNCATED_IMAGES``) keeps it, and the
            decoders load it with its missing tail grey. Counted in the manifest
            (``counts.truncated_images``) either way (needs ``verify_images``).
    """

    max_prompt_tokens: int = 1024
    max_target_tokens: int = 1024
    max_text_chars: int = 16384
    workers: int = 1
    verify_images: bool = True
    long_entries: str = "reject"
    truncated_images: str = "reject"

    def __post_init__(self) -> None:
        _positive_int(self, "max_prompt_tokens", "max_target_tokens", "max_text_chars", "workers")
        require(
            self.long_entries in ("reject", "keep"),
            "PreprocessConfig.long_entries",
            f"must be 'reject' or 'keep', got {self.long_entries!r}",
        )
        require(
            self.truncated_images in ("reject", "load"),
            "PreprocessConfig.truncated_images",
            f"must be 'reject' or 'load', got {self.truncated_images!r}",
        )


# Target weights (normalised when used) of the official train.py ``get_balancing_data``.
# "task-lang-balancing" is what the paper's runs use (every slurm script sets it); the other
# two pretraining presets are the official alternatives.
BALANCING_PRESETS: dict[str, dict[str, float]] = {
    "task-lang-balancing": {k: 1.0 for k in PRETRAINING_KEYS},
    "task-balancing": {  # captions 10/20, translations 10/20 of the mass
        **{k: 5.0 for k in PRETRAINING_KEYS if k.startswith("caption")},
        **{k: 2.0 for k in PRETRAINING_KEYS if k.startswith("translation")},
    },
    "lang-balancing": {  # every target language 2/12 ("de" split over caption + translation)
        **{k: 2.0 for k in PRETRAINING_KEYS},
        "caption-de": 1.0,
        "translation-de": 1.0,
    },
    "generalist-finetune": {k: 1.0 for k in FINETUNING_KEYS},
}


@dataclass
class SamplerConfig:
    """Task-language balanced sampling, blending and data-parallel sharding.

    Args:
        balancing: preset name (:data:`BALANCING_PRESETS`: "task-lang-balancing", uniform
            over the 7 pretraining keys; "task-balancing", captions 5 : translations 2 per
            key; "lang-balancing", uniform per target language; "generalist-finetune",
            uniform over the 11 fine-tuning keys) or "custom" with ``target``.
        target: custom key -> weight (normalised); None for a preset's uniform target.
        dataset_weights: blend weight per dataset (None = equal); normalised.
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        data_parallel_size / data_parallel_rank: this rank's contiguous slice of each batch.
        seed: everything (epoch orders, tie-breaks) derives from it.
    """

    balancing: str = "task-lang-balancing"
    target: dict[str, float] | None = None
    dataset_weights: tuple[float, ...] | None = None
    global_batch_size: int = 1024
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        name = "SamplerConfig"
        if self.balancing == "custom":
            require(bool(self.target), f"{name}.target", "balancing='custom' needs a target dict")
        else:
            require(
                self.balancing in BALANCING_PRESETS,
                f"{name}.balancing",
                f"unknown preset {self.balancing!r}; use one of "
                f"{sorted(BALANCING_PRESETS)} or 'custom' with a target",
            )
            require(
                self.target is None,
                f"{name}.target",
                "only used with balancing='custom'; set it to None",
            )
        for k, w in (self.target or {}).items():
            require(k in ALL_KEYS, f"{name}.target", f"unknown key {k!r}; keys are {ALL_KEYS}")
            require(w >= 0, f"{name}.target", f"weight of {k!r} must be >= 0, got {w}")
        if self.target:
            require(sum(self.target.values()) > 0, f"{name}.target", "weights sum to 0")
        if self.dataset_weights is not None:
            require(
                all(w >= 0 for w in self.dataset_weights) and sum(self.dataset_weights) > 0,
                f"{name}.dataset_weights",
                "must be non-negative with a positive sum",
            )
        _positive_int(self, "global_batch_size", "data_parallel_size")
        require(
            self.global_batch_size % self.data_parallel_size == 0,
            f"{name}.global_batch_size",
            f"{self.global_batch_size} is not divisible by data_parallel_size "
            f"{self.data_parallel_size}",
        )
        require(
            0 <= self.data_parallel_rank < self.data_parallel_size,
            f"{name}.data_parallel_rank",
            f"must be in [0, {self.data_parallel_size}), got {self.data_parallel_rank}",
        )

    def target_weights(self) -> dict[str, float]:
        """Normalised key -> share."""
        raw = (
            self.target
            if self.balancing == "custom"
            else BALANCING_PRESETS[self.balancing]
        )
        total = float(sum(raw.values()))
        return {k: w / total for k, w in raw.items() if w > 0}


@dataclass
class BatchConfig:
    """Padded encoder/decoder token batches.

    Args:
        max_prompt_tokens / max_target_tokens: crop lengths (SYSTEM.md: 128 / 128).
        pad_to: "longest" (in the batch, rounded up to ``pad_multiple``) or "max" (fixed shapes).
        pad_multiple: round padded lengths up to a multiple of this (8 for tensor cores; use a
            multiple of TP with sequence parallel).
        encoder_pad_id: BART ``<pad>`` (1). decoder_pad_id: Gemma ``<pad>`` (0).
        decoder_start_id: first decoder input (1 = ``<eos>``, official decoder_start_token_id).
        ignore_index: label of padded positions (-100, torch cross-entropy's default).
        keep_eos_on_crop: a cropped sequence keeps its last token (``</s>`` / ``<eos>``) in
            its last slot, as a Hugging Face tokenizer's ``truncation=True, max_length=L``
            does (the official CE eval's crop to 447 / 1024); False cuts the tail off, as the
            official training loader's ``ids[:128]``.
    """

    max_prompt_tokens: int = 128
    max_target_tokens: int = 128
    pad_to: str = "longest"
    pad_multiple: int = 8
    encoder_pad_id: int = 1
    decoder_pad_id: int = 0
    decoder_start_id: int = 1
    ignore_index: int = IGNORE_INDEX
    keep_eos_on_crop: bool = False

    def __post_init__(self) -> None:
        _positive_int(self, "max_prompt_tokens", "max_target_tokens", "pad_multiple")
        require(
            self.pad_to in ("longest", "max"),
            "BatchConfig.pad_to",
            f"must be 'longest' or 'max', got {self.pad_to!r}",
        )


@dataclass
class ImageConfig:
    """Image decoding: back-end and output size.

    Args:
        size: square output side (224 pretraining, 768 fine-tuning).
        backend: "pil" (CPU, DataLoader workers), "torchvision" (nvjpeg, batched on CUDA),
            "dali" (NVIDIA DALI pipeline, on the CPU or the GPU: ``dali_device``), or "auto"
            (dali > torchvision > pil, as installed and with CUDA; pil without CUDA).
        mean / std: ImageNet normalisation (SYSTEM.md).
        device: CUDA device of the GPU back-ends.
        dali_device: where the dali back-end decodes and resizes: "cpu" (a CPU-only DALI
            pipeline, no GPU needed), "gpu" (nvjpeg "mixed" decode on ``device``), or "auto"
            ("gpu" when ``device`` is a CUDA device and CUDA is available, else "cpu").
        load_truncated: the PIL back-end decodes a truncated JPEG with its missing tail grey
            (PIL ``LOAD_TRUNCATED_IMAGES``, as the official loader) instead of failing. Only
            datasets preprocessed with ``truncated_images="load"`` hold such images (the
            default rejects them); torchvision does not implement it; dali decodes a batch
            holding one with the PIL back-end.
    """

    size: int = 224
    backend: str = "pil"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    device: str = "cuda"
    dali_device: str = "auto"
    load_truncated: bool = True

    def __post_init__(self) -> None:
        _positive_int(self, "size")
        require(
            self.backend in ("pil", "torchvision", "dali", "auto"),
            "ImageConfig.backend",
            f"must be one of pil, torchvision, dali, auto; got {self.backend!r}",
        )
        require(
            self.dali_device in ("auto", "cpu", "gpu"),
            "ImageConfig.dali_device",
            f"must be one of auto, cpu, gpu; got {self.dali_device!r}",
        )
        require(
            len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std),
            "ImageConfig.std",
            "mean and std need 3 values, std > 0",
        )
