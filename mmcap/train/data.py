"""This rank's training batches for :mod:`mmcap.train.loop`: sampler -> padded local batch
-> the step's micro-batches, plus the step's sample / image / model-FLOP counts."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from mmcap.config import ConfigError
from mmcap.data.compat import check_datasets_fit_model
from mmcap.model.stage_io import sequence_parallel_pad_multiple, split_microbatches
from mmcap.train.config import TrainConfig


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _open(path: str, key: str):
    """A CaptionDataset, or a ConfigError naming the key (missing, not preprocessed, damaged)."""
    from mmcap.data.indexed import CaptionDataset

    try:
        return CaptionDataset(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


class BatchSource:
    """This rank's batches, each split into the step's micro-batches.

    Non-first pipeline stages do not decode images (they only need the shapes and the
    image mask); with a feature cache, cached vision features replace pixels.
    """

    def __init__(
        self, cfg: TrainConfig, model_cfg, *, needs_pixels: bool, dp_rank: int, dp_size: int
    ):
        from mmcap.data.features import FeatureStore
        from mmcap.data.sampler import GroupIndex, TaskLangSampler

        d = cfg.data
        if not d.train:
            raise ConfigError("data.train: no training dataset given (data.train=[DIR, ...])")
        self.datasets = [_open(p, "data.train") for p in d.train]
        check_datasets_fit_model(self.datasets, model_cfg, "data.train")
        self.num_microbatches = cfg.num_microbatches(dp_size)
        self.micro_batch_size = cfg.micro_batch_size
        self.num_image_tokens = model_cfg.vision.num_image_tokens
        self.batch_cfg = dataclasses.replace(
            d.batch,
            pad_multiple=sequence_parallel_pad_multiple(
                d.batch.pad_multiple, cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel
            ),
        )
        self.sampler = TaskLangSampler(
            [GroupIndex.from_dataset(ds) for ds in self.datasets],
            dataclasses.replace(
                d.sampler, data_parallel_size=dp_size, data_parallel_rank=dp_rank
            ),
        )
        self.features = None
        self.image_cfg = None
        if needs_pixels and d.features:
            self.features = [FeatureStore(p, ds) for p, ds in zip(d.features, self.datasets)]
        elif needs_pixels:
            self.image_cfg = dataclasses.replace(
                d.image,
                size=model_cfg.vision.image_size,
                device="cuda" if torch.cuda.is_available() else "cpu",
            )
        self.num_workers = d.num_workers
        self._it = None

    def summary(self, train_steps: int, global_batch_size: int) -> list[str]:
        """Lines describing the training data for the start of a run, with warnings for keys
        the sampling target asks for but the data lacks and for a global batch larger than
        the data."""
        per_key: dict[str, int] = {}
        for ds in self.datasets:
            for k, n in (ds.manifest.get("per_key") or {}).items():
                per_key[k] = per_key.get(k, 0) + int(n)
        total = sum(len(ds) for ds in self.datasets)
        lines = [
            f"data: {total} entries in {len(self.datasets)} dataset(s); per key: "
            + ", ".join(f"{k} {n}" for k, n in sorted(per_key.items()))
        ]
        wanted = sorted(self.sampler.cfg.target_weights())
        missing = [k for k in wanted if per_key and not per_key.get(k)]
        if missing:
            lines.append(f"WARNING data: sampling-target keys missing from the data: {missing}")
        seen = train_steps * global_batch_size
        lines.append(f"data: the run draws {seen} samples = {seen / max(total, 1):.1f} epochs")
        if global_batch_size > total:
            lines.append(
                f"WARNING data: global_batch_size {global_batch_size} exceeds the {total} entries "
                "of the data: every step repeats samples (lower global_batch_size)"
            )
        return lines

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def _iterator(self):
        from mmcap.data.loader import iterate_batches

        return iterate_batches(
            self.datasets,
            self.sampler,
            self.batch_cfg,
            self.image_cfg,
            num_workers=self.num_workers,
            features=self.features,
            multiprocessing_context="forkserver" if self.num_workers else None,
            workers_ignore_sigterm=True,
        )

    def next(self):
        """(micro-batches, CaptionBatch) of the next step."""
        if self._it is None:
            self._it = self._iterator()
        batch = next(self._it)
        mbs = split_microbatches(
            batch.tokens,
            self.micro_batch_size,
            num_image_tokens=self.num_image_tokens,
            has_image=torch.from_numpy(batch.image >= 0),
            pixels=batch.pixels,
            features=batch.features,
            key=torch.from_numpy(np.asarray(batch.key, dtype=np.int64)),
            device=current_device(),
        )
        return mbs, batch

    def close(self) -> None:
        """Shut the DataLoader workers down now (not at interpreter exit)."""
        it, self._it = self._it, None
        if it is not None:
            it.close()  # GeneratorExit inside iterate_batches frees its DataLoader iterator


class StepCounter:
    """[samples, images, model FLOPs] of a local batch (real lengths, not padding).

    :func:`mmcap.train.flops.step_flops` per sample, cached by (prompt length, target length,
    has image): lengths are bounded by the crop lengths, so the per-step cost is a few dict
    lookups instead of a per-layer sum for every sample.

    Args:
        count_vision: False with a feature cache (the vision tower does not run).
    """

    def __init__(self, model_cfg, count_vision: bool):
        from mmcap.train.flops import step_flops

        self._flops = functools.lru_cache(maxsize=None)(
            lambda p, t, img: step_flops(model_cfg, p, t, img, count_vision=count_vision)
        )

    def __call__(self, batch) -> torch.Tensor:
        t = batch.tokens
        p_len = t.encoder_attention_mask.sum(1).tolist()
        t_len = t.decoder_attention_mask.sum(1).tolist()
        has_image = (batch.image >= 0).tolist()
        flops = sum(self._flops(p, n, i) for p, n, i in zip(p_len, t_len, has_image))
        return torch.tensor([len(p_len), sum(has_image), flops], dtype=torch.float64)
