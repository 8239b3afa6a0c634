"""This rank's training batches for :mod:`mmcap.train.loop`: sampler -> padded local batch
-> (packed rows, with ``data.packing``) -> the step's micro-batches, plus the step's sample /
image / model-FLOP counts and the useful-token fractions."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from mmcap.config import ConfigError
from mmcap.data.compat import check_datasets_fit_model
from mmcap.model.stage_io import (
    sequence_parallel_pad_multiple,
    split_microbatches,
    split_packed_microbatches,
)
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
        self.packing = d.packing
        if d.packing:
            self.enc_row, self.dec_row = packing_row_lengths(cfg, model_cfg, self.batch_cfg)
            p = cfg.parallel
            # The interleaved schedule wants whole groups of PP micro-batches.
            groups = p.pipeline_parallel if (p.virtual_pipeline_parallel or 1) > 1 else 1
            self.row_multiple = cfg.micro_batch_size * groups
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
        has_image = batch.image >= 0
        key = np.asarray(batch.key, dtype=np.int64)
        if self.packing:
            from mmcap.data.packing import pack_batch

            rows = pack_batch(
                batch.tokens,
                has_image,
                key,
                num_image_tokens=self.num_image_tokens,
                enc_row=self.enc_row,
                dec_row=self.dec_row,
                cfg=self.batch_cfg,
                row_multiple=self.row_multiple,
            )
            batch.encoder_slots = rows.num_rows * self.enc_row
            batch.decoder_slots = rows.num_rows * self.dec_row
            mbs = split_packed_microbatches(
                rows,
                self.micro_batch_size,
                num_image_tokens=self.num_image_tokens,
                pixels=batch.pixels,
                features=batch.features,
                device=current_device(),
            )
            return mbs, batch
        b, lp = batch.tokens.encoder_input_ids.shape
        n = self.num_image_tokens if has_image.any() else 0
        # Image rows are computed for samples with an image (mixed batches encode text-only
        # samples from their prompt alone).
        batch.encoder_slots = b * lp + n * int(has_image.sum())
        batch.decoder_slots = batch.tokens.decoder_input_ids.numel()
        mbs = split_microbatches(
            batch.tokens,
            self.micro_batch_size,
            num_image_tokens=self.num_image_tokens,
            has_image=torch.from_numpy(has_image),
            pixels=batch.pixels,
            features=batch.features,
            key=torch.from_numpy(key),
            device=current_device(),
        )
        return mbs, batch

    def close(self) -> None:
        """Shut the DataLoader workers down now (not at interpreter exit)."""
        it, self._it = self._it, None
        if it is not None:
            it.close()  # GeneratorExit inside iterate_batches frees its DataLoader iterator


def packing_row_lengths(cfg: TrainConfig, model_cfg, batch_cfg) -> tuple[int, int]:
    """(encoder, decoder) packed row lengths: the configured ones, else image tokens + prompt
    crop / target crop (rounded up to the padding multiple); ConfigError when a row is
    shorter than one sample may be, or breaks the sequence-parallel split."""
    d = cfg.data
    need_enc = model_cfg.vision.num_image_tokens + batch_cfg.max_prompt_tokens
    m = batch_cfg.pad_multiple
    need_dec = batch_cfg.max_target_tokens
    enc = d.packing_encoder_length or need_enc
    dec = d.packing_decoder_length or -(-need_dec // m) * m
    if enc < need_enc:
        raise ConfigError(
            f"data.packing_encoder_length: {enc} is shorter than one sample's encoder part "
            f"({model_cfg.vision.num_image_tokens} image tokens + data.batch.max_prompt_tokens "
            f"{batch_cfg.max_prompt_tokens} = {need_enc}); raise it or lower the crop"
        )
    if dec < need_dec:
        raise ConfigError(
            f"data.packing_decoder_length: {dec} is shorter than data.batch.max_target_tokens "
            f"{need_dec}; raise it or lower the crop"
        )
    if dec % m:
        raise ConfigError(
            f"data.packing_decoder_length: {dec} must be a multiple of {m} (the padding "
            "multiple; with sequence parallelism a multiple of TP)"
        )
    return enc, dec


class StepCounter:
    """[samples, images, model FLOPs, encoder tokens, encoder slots, decoder tokens, decoder
    slots] of a local batch: FLOPs on real lengths, not padding; slots = what the model computes
    (padding included), so tokens / slots is the useful-token fraction.

    :func:`mmcap.train.flops.step_flops` per sample, cached by (prompt length, target length,
    has image): lengths are bounded by the crop lengths, so the per-step cost is a few dict
    lookups instead of a per-layer sum for every sample.

    Args:
        count_vision: False with a feature cache (the vision tower does not run).
    """

    def __init__(self, model_cfg, count_vision: bool):
        from mmcap.train.flops import step_flops

        self.num_image_tokens = model_cfg.vision.num_image_tokens
        self._flops = functools.lru_cache(maxsize=None)(
            lambda p, t, img: step_flops(model_cfg, p, t, img, count_vision=count_vision)
        )

    def __call__(self, batch) -> torch.Tensor:
        t = batch.tokens
        p_len = t.encoder_attention_mask.sum(1).tolist()
        t_len = t.decoder_attention_mask.sum(1).tolist()
        has_image = (batch.image >= 0).tolist()
        flops = sum(self._flops(p, n, i) for p, n, i in zip(p_len, t_len, has_image))
        enc_tokens = sum(p_len) + self.num_image_tokens * sum(has_image)
        return torch.tensor(
            [
                len(p_len),
                sum(has_image),
                flops,
                enc_tokens,
                batch.encoder_slots,
                sum(t_len),
                batch.decoder_slots,
            ],
            dtype=torch.float64,
        )
