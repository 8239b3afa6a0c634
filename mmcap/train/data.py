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


def to_device(value, device: torch.device | str, pin: bool | None = None):
    """``value`` (a tensor, or a dataclass of them such as a MicroBatch) with its tensors on
    ``device``. Host tensors are copied with ``non_blocking=True`` from pinned memory (pinned
    here unless the DataLoader pinned them; ``pin`` defaults to "device is CUDA"): a copy
    without it makes PyTorch wait on the stream, i.e. for every kernel still queued. Tensors
    already on ``device`` (pixels decoded on the GPU) stay."""
    device = torch.device(device)
    if pin is None:
        pin = device.type == "cuda"
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if pin and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: to_device(getattr(value, f.name), device, pin)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **moved)
    return value


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
            self.enc_row, self.dec_row = packing_row_lengths(
                cfg, model_cfg, self.batch_cfg, self.datasets, self.sampler.cfg.target_weights()
            )
            p = cfg.parallel
            # Pipeline stages exchange one fixed shape: whole micro-batches of rows (padded
            # with empty rows), and the interleaved schedule wants groups of PP of them.
            # Without PP the last micro-batch may be smaller.
            groups = p.pipeline_parallel if (p.virtual_pipeline_parallel or 1) > 1 else 1
            self.partial_microbatch = p.pipeline_parallel == 1
            self.row_multiple = 1 if self.partial_microbatch else cfg.micro_batch_size * groups
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
        # Micro-batches are cut on the host, then copied (to_device: pinned, non_blocking).
        dev = current_device()
        host_pixels = batch.pixels is None or batch.pixels.device.type == "cpu"
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
            # Pixels decoded on the GPU: stage_io gathers them per micro-batch on the device.
            split_on = "cpu" if host_pixels else dev
            mbs = split_packed_microbatches(
                rows,
                self.micro_batch_size,
                num_image_tokens=self.num_image_tokens,
                pixels=batch.pixels,
                features=batch.features,
                device=split_on,
                allow_partial=self.partial_microbatch,
            )
            return [to_device(mb, dev) for mb in mbs], batch
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
            pixels=batch.pixels if host_pixels else None,
            features=batch.features,
            key=torch.from_numpy(key),
            device="cpu",
        )
        mbs = [to_device(mb, dev) for mb in mbs]
        if not host_pixels:  # decoded on the GPU: slices of the device tensor
            m = self.micro_batch_size
            mbs = [
                dataclasses.replace(mb, pixel_values=batch.pixels[i * m : (i + 1) * m])
                if mb.num_image_tokens
                else mb
                for i, mb in enumerate(mbs)
            ]
        return mbs, batch

    def close(self) -> None:
        """Shut the DataLoader workers down now (not at interpreter exit)."""
        it, self._it = self._it, None
        if it is not None:
            it.close()  # GeneratorExit inside iterate_batches frees its DataLoader iterator


def expected_lengths(
    datasets, weights: dict[str, float], num_image_tokens: int, batch_cfg, limit: int = 1 << 20
) -> tuple[float, float] | None:
    """Mean (encoder, decoder) tokens of a sample under the sampling target ``weights``:
    per key the mean cropped prompt (+ image tokens for entries with an image) and target
    lengths of the data (at most ``limit`` evenly spaced entries per dataset), weighted by
    the key's share. None when the data hold none of the keys."""
    from mmcap.data.prompts import ALL_KEYS

    sums: dict[int, np.ndarray] = {}
    for ds in datasets:
        n = len(ds)
        rows = np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)
        key = np.asarray(ds.entries["key"])[rows]
        img = np.asarray(ds.entries["image"])[rows] >= 0
        p = np.minimum(ds.prompts.lengths[rows], batch_cfg.max_prompt_tokens)
        t = np.minimum(ds.targets.lengths[rows], batch_cfg.max_target_tokens)
        enc = p + num_image_tokens * img
        for k in np.unique(key).tolist():
            m = key == k
            acc = sums.setdefault(k, np.zeros(3))
            acc += (m.sum(), enc[m].sum(), t[m].sum())
    total_w = enc_mean = dec_mean = 0.0
    for name, w in weights.items():
        acc = sums.get(ALL_KEYS.index(name))
        if acc is None or not acc[0]:
            continue
        total_w += w
        enc_mean += w * acc[1] / acc[0]
        dec_mean += w * acc[2] / acc[0]
    if not total_w:
        return None
    return enc_mean / total_w, dec_mean / total_w


def packing_row_lengths(
    cfg: TrainConfig, model_cfg, batch_cfg, datasets=(), weights=None
) -> tuple[int, int]:
    """(encoder, decoder) packed row lengths: the configured ones, else automatic rows
    (:func:`mmcap.data.packing.auto_row_lengths`: ~4 samples of the data's mean lengths per
    row, in the data's encoder : decoder ratio, at least one longest sample); ConfigError
    when a row is shorter than one sample may be, or breaks the sequence-parallel split."""
    from mmcap.data.packing import auto_row_lengths

    d = cfg.data
    need_enc = model_cfg.vision.num_image_tokens + batch_cfg.max_prompt_tokens
    m = batch_cfg.pad_multiple
    need_dec = batch_cfg.max_target_tokens
    auto_enc, auto_dec = need_enc, -(-need_dec // m) * m
    means = expected_lengths(
        datasets, weights or {}, model_cfg.vision.num_image_tokens, batch_cfg
    ) if datasets else None
    if means is not None:
        auto_enc, auto_dec = auto_row_lengths(*means, need_enc, need_dec, dec_multiple=m)
    enc = d.packing_encoder_length or auto_enc
    dec = d.packing_decoder_length or auto_dec
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
        from mmcap.train.flops import step_flops, vision_forward_flops

        if count_vision:  # measured once (meta device) here, not inside the first step
            vision_forward_flops(model_cfg.vision)
        self.num_image_tokens = model_cfg.vision.num_image_tokens
        self._flops = functools.lru_cache(maxsize=None)(
            lambda p, t, img: step_flops(model_cfg, p, t, img, count_vision=count_vision)
        )

    def __call__(self, batch) -> torch.Tensor:
        # Host data: numpy, not tensor reads (the trainer counts those as syncs; tests).
        t = batch.tokens
        p_len = t.encoder_attention_mask.numpy().sum(1).tolist()
        t_len = t.decoder_attention_mask.numpy().sum(1).tolist()
        has_image = (np.asarray(batch.image) >= 0).tolist()
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
