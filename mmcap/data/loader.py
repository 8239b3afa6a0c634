"""Training batches: sampler -> token batch (main process) -> pixels (workers or GPU).

Token assembly reads ids straight from the memory-mapped stores (no tokenizing, no text), so
it stays in the training process; with the ``pil`` back-end, JPEG decoding runs in DataLoader
workers that get only (dataset, image row) references; GPU back-ends decode in the training
process on the whole batch. Samples without an image (text-only translations) get zeros in
``pixels`` and ``has_image = False``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmcap.data.collate import TokenBatch, collate_tokens
from mmcap.data.config import BatchConfig, ImageConfig
from mmcap.data.images import PILDecoder, build_image_decoder
from mmcap.data.indexed import CaptionDataset, _TokenStore
from mmcap.data.sampler import GlobalBatch, TaskLangSampler


@dataclass
class CaptionBatch:
    """One rank's batch.

    Args:
        tokens: padded encoder/decoder ids, masks and labels.
        dataset / entry / key / image: per sample, dataset index, entry row, task-language
            key id and image row (-1 = none); enough to trace every sample to its record.
        step / state: global batch index and the sampler state after it (checkpoint this).
        pixels: float32 [B, 3, S, S] when images are loaded, else None.
        features: bf16 [B, tokens, width] from a feature cache instead of pixels, else None.
        has_image: bool [B].
    """

    tokens: TokenBatch
    dataset: np.ndarray
    entry: np.ndarray
    key: np.ndarray
    image: np.ndarray
    step: int
    state: dict
    pixels: torch.Tensor | None = None
    features: torch.Tensor | None = None
    decode_failures: int = 0  # images of this batch that failed to decode (blank instead)
    # Token slots the model computes for this batch (padding included; set by the trainer's
    # batch source, padded or packed), for the useful-token fraction.
    encoder_slots: int = 0
    decoder_slots: int = 0

    @property
    def has_image(self) -> torch.Tensor:
        return torch.from_numpy(self.image >= 0)


class TokenBatchAssembler:
    """Sampler batches -> :class:`CaptionBatch` without pixels.

    Args:
        datasets: the sampler's datasets, same order.
        cfg: crop lengths and padding.
    """

    def __init__(self, datasets: list[CaptionDataset], cfg: BatchConfig):
        self.datasets, self.cfg = datasets, cfg
        self._image_col = [np.asarray(ds.entries["image"]) for ds in datasets]

    def __call__(self, gb: GlobalBatch) -> CaptionBatch:
        prompts, targets = [None] * len(gb.entry), [None] * len(gb.entry)
        image = np.empty(len(gb.entry), dtype=np.int64)
        for d in np.unique(gb.dataset):
            (idx,) = np.nonzero(gb.dataset == d)
            ds, rows = self.datasets[d], gb.entry[idx]
            image[idx] = self._image_col[d][rows]
            for store, out in ((ds.prompts, prompts), (ds.targets, targets)):
                starts, lengths = store.starts[rows], store.lengths[rows]
                flat = store.flat
                for i, s, n in zip(idx.tolist(), starts.tolist(), lengths.tolist()):
                    out[i] = flat[s : s + n]
        tokens = collate_tokens(prompts, targets, self.cfg)
        return CaptionBatch(tokens, gb.dataset, gb.entry, gb.key, image, gb.step, gb.state)


class _ImageStore:
    """JPEG bytes by (dataset index, image row); each dataset's store opened lazily (once per
    DataLoader worker: memmaps are not pickled, only the paths)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._stores: dict[int, _TokenStore] = {}

    def jpegs(self, datasets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """(positions that have an image, their JPEG bytes)."""
        present = np.nonzero(rows >= 0)[0]
        out = []
        for i in present.tolist():
            d = int(datasets[i])
            if d not in self._stores:
                self._stores[d] = _TokenStore(str(Path(self.paths[d]) / "images"))
            out.append(self._stores[d][int(rows[i])].tobytes())
        return present, out


class _PILImages(torch.utils.data.Dataset):
    """DataLoader dataset whose "index" is one batch's (dataset indices, image rows)."""

    def __init__(self, paths: list[str], cfg: ImageConfig):
        self.store, self.cfg = _ImageStore(paths), cfg
        self.decoder = PILDecoder(cfg, tolerant=True)

    def __len__(self) -> int:  # indices come from the batch stream, not a range
        return 0

    def __getitem__(self, refs: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, int]:
        """(pixels, images of this batch that failed to decode)."""
        before = self.decoder.failures
        pixels = decode_batch(self.decoder, self.store, *refs, self.cfg, device="cpu")
        return pixels, self.decoder.failures - before


def decode_batch(
    decoder, store: _ImageStore, datasets: np.ndarray, rows: np.ndarray, cfg: ImageConfig, device
) -> torch.Tensor:
    """float32 [B, 3, S, S]; zeros where rows == -1."""
    s = cfg.size
    out = torch.zeros((len(rows), 3, s, s), dtype=torch.float32, device=device)
    present, jpegs = store.jpegs(datasets, rows)
    if jpegs:
        out[torch.from_numpy(present).to(out.device)] = decoder(jpegs)
    return out


def iterate_batches(
    datasets: list[CaptionDataset],
    sampler: TaskLangSampler,
    batch_cfg: BatchConfig,
    image_cfg: ImageConfig | None = None,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    features: list | None = None,
    multiprocessing_context: str | None = None,
    workers_ignore_sigterm: bool = False,
):
    """Infinite iterator of :class:`CaptionBatch`: pixels filled when ``image_cfg`` is given,
    vision features when ``features`` (one :class:`FeatureStore` per dataset) is given.

    ``workers_ignore_sigterm``: PIL workers ignore SIGTERM / SIGINT (the trainer: a preempted
    job signals every process, and the workers must outlive the trainer's checkpoint)."""
    assemble = TokenBatchAssembler(datasets, batch_cfg)
    if features is not None:
        for gb in sampler:
            batch = assemble(gb)
            batch.features = gather_features(features, batch.dataset, batch.image)
            yield batch
        return
    if image_cfg is None:
        for gb in sampler:
            yield assemble(gb)
        return
    if image_cfg.backend != "pil":
        decoder = build_image_decoder(image_cfg, tolerant=True)
        store = _ImageStore([str(ds.path) for ds in datasets])
        for gb in sampler:
            batch = assemble(gb)
            before = getattr(decoder, "failures", 0)
            batch.pixels = decode_batch(
                decoder, store, batch.dataset, batch.image, image_cfg, device=image_cfg.device
            )
            batch.decode_failures = getattr(decoder, "failures", 0) - before
            yield batch
        return
    pending: deque[CaptionBatch] = deque()

    def refs_stream():  # runs in this process as the DataLoader's sampler
        for gb in sampler:
            batch = assemble(gb)
            pending.append(batch)
            yield (batch.dataset, batch.image)

    loader = torch.utils.data.DataLoader(
        _PILImages([str(ds.path) for ds in datasets], image_cfg),
        sampler=refs_stream(),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
        # Pinned pixels: the trainer's host->device copy is non_blocking (mmcap.train.data).
        pin_memory=torch.cuda.is_available(),
        # "forkserver" when this process may hold threads (compiled kernels, OpenMP pools)
        multiprocessing_context=multiprocessing_context if num_workers else None,
        worker_init_fn=_ignore_termination if num_workers and workers_ignore_sigterm else None,
        # Its own generator: creating the iterator draws the workers' base seed, which would
        # otherwise consume the GLOBAL torch RNG (dropout's) at a point that differs between a
        # fresh and a resumed run; workers use no randomness.
        generator=torch.Generator().manual_seed(0),
    )
    for pixels, failures in loader:  # DataLoader keeps the sampler's order
        batch = pending.popleft()
        batch.pixels, batch.decode_failures = pixels, failures
        yield batch


def _ignore_termination(_worker_id: int) -> None:
    """Workers ignore SIGTERM / SIGINT: a preempted job signals every process, and a worker
    dying first would raise in the trainer (DataLoader's SIGCHLD handler) in the middle of its
    SIGTERM checkpoint. Workers still exit with the trainer (DataLoader's manager watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from mmcap.parallel.lifetime import die_with_parent

    die_with_parent()  # a worker never outlives its rank (even one killed with SIGKILL)


def gather_features(stores: list, datasets: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Cached vision features of a batch (zeros where ``rows == -1``)."""
    first = stores[0]
    out = torch.zeros((len(rows), first.tokens, first.width), dtype=torch.bfloat16)
    for d in np.unique(datasets).tolist():
        (idx,) = np.nonzero(datasets == d)
        out[torch.from_numpy(idx)] = stores[d].gather(rows[idx])
    return out
