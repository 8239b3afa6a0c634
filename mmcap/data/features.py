"""Frozen-vision feature cache: image tokens of the frozen vision tower, computed once.

The vision tower, projection, position embedding and projection norm never train (SYSTEM.md
"What trains"), yet the official code recomputes them every step. :func:`cache_features` runs
the frozen :class:`mmcap.model.vision.VisionTower` once over a dataset's image store and writes
its output, ``[1 + (S/32)^2, projection_dim]`` per image (224 px: 50 x 1024, 768 px:
577 x 1024), in megatron-core's indexed format: one record per image row of the dataset.
megatron's format has no bfloat16 code, so the bf16 values are stored as their uint16 bit
patterns and viewed back as ``torch.bfloat16`` on read (no conversion, no rounding).

A cache directory holds ``features.bin/.idx`` and ``features.json`` (written last, then the
directory is renamed into place: a killed run leaves no cache that reads as complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mmcap.config import VisionConfig, replace
from mmcap.data.config import ImageConfig
from mmcap.data.indexed import CaptionDataset, _TokenStore
from mmcap.data.manifest import write_json_durable

FEATURES_FORMAT = "mmcap-vision-features-v1"
BYTES_PER_VALUE = 2  # bfloat16


def feature_shape(vision: VisionConfig, image_size: int) -> tuple[int, int]:
    """(tokens, width) per image: (1 + (S/32)^2, projection_dim)."""
    return replace(vision, image_size=image_size).num_image_tokens, vision.projection_dim


def storage_bytes(num_images: int, vision: VisionConfig, image_size: int) -> int:
    tokens, width = feature_shape(vision, image_size)
    return num_images * tokens * width * BYTES_PER_VALUE


def describe_storage(num_images: int, vision: VisionConfig, image_size: int) -> str:
    tokens, width = feature_shape(vision, image_size)
    total = storage_bytes(num_images, vision, image_size)
    return (
        f"{num_images:,} images x {tokens} tokens x {width} values x 2 B (bf16) = "
        f"{total:,} B ({total / 2**30:.2f} GiB)"
    )


def cache_features(
    dataset: CaptionDataset,
    tower: torch.nn.Module,
    vision: VisionConfig,
    out: str | Path,
    image_size: int,
    backend: str = "pil",
    batch_size: int = 64,
    device: str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Write the tower's output for every image row of ``dataset`` to the cache ``out``.

    Args:
        tower: the frozen vision tower (pixels [B, 3, S, S] -> [B, tokens, width]).
        image_size: S; backend: image decoder ("pil", "torchvision", "dali").
        compute_dtype: dtype of the forward (autocast on CUDA for bf16/fp16); stored as bf16.
    Returns:
        The cache's ``features.json`` contents.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mmcap.data.images import build_image_decoder

    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    n = len(dataset.images)
    tokens, width = feature_shape(vision, image_size)
    need = storage_bytes(n, vision, image_size)
    log(f"feature cache {out}: {describe_storage(n, vision, image_size)}")
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if need > free:
        raise OSError(f"the cache needs {need:,} B but {out.parent} has {free:,} B free")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    image_cfg = ImageConfig(size=image_size, backend=backend)
    if backend != "pil":
        image_cfg = dataclasses.replace(image_cfg, device=device)
    decoder = build_image_decoder(image_cfg)
    builder = IndexedDatasetBuilder(str(tmp / "features.bin"), dtype=np.uint16)
    tower = tower.to(device).eval()
    autocast = torch.autocast(
        torch.device(device).type, dtype=compute_dtype, enabled=compute_dtype != torch.float32
    )
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        pixels = decoder([dataset.image_bytes(r) for r in rows]).to(device)
        with torch.no_grad(), autocast:
            feats = tower(pixels)
        if feats.shape[1:] != (tokens, width):
            raise ValueError(
                f"tower output {tuple(feats.shape[1:])} != expected {(tokens, width)}; "
                "check the vision config and image size"
            )
        # bf16 bit patterns (megatron's format has no bf16 code); int16 view -> uint16, no copy
        bits = feats.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
        for f in bits:
            builder.add_item(torch.from_numpy(f.reshape(-1)))
            builder.end_document()
    builder.finalize(str(tmp / "features.idx"))
    meta = {
        "format": FEATURES_FORMAT,
        "dataset": dataset.fingerprint,
        "images": n,
        "image_size": image_size,
        "tokens": tokens,
        "width": width,
        "dtype": "bfloat16 stored as uint16 bits",
        "compute_dtype": str(compute_dtype),
        "backend": backend,
        "vision": dataclasses.asdict(vision),
        "bytes": need,
    }
    write_json_durable(tmp / "features.json", meta)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


class FeatureStore:
    """Reads a feature cache: ``gather(rows)`` -> bf16 ``[B, tokens, width]`` (zeros for -1).

    Args:
        path: cache directory. dataset: if given, the cache must have been built from it.
    """

    def __init__(self, path: str | Path, dataset: CaptionDataset | None = None):
        self.path = Path(path)
        meta_file = self.path / "features.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a complete feature cache (no features.json)"
            )
        self.meta = json.loads(meta_file.read_text())
        if dataset is not None and self.meta["dataset"] != dataset.fingerprint:
            raise ValueError(
                f"{self.path} was built from dataset {self.meta['dataset']}, not "
                f"{dataset.fingerprint} ({dataset.path}); rebuild the cache"
            )
        self.tokens, self.width = self.meta["tokens"], self.meta["width"]
        self.store = _TokenStore(str(self.path / "features"))

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, row: int) -> torch.Tensor:
        bits = np.array(self.store[row]).view(np.int16)  # copy out of the read-only mmap
        return torch.from_numpy(bits).view(torch.bfloat16).view(self.tokens, self.width)

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        out = torch.zeros((len(rows), self.tokens, self.width), dtype=torch.bfloat16)
        for i, r in enumerate(np.asarray(rows).tolist()):
            if r >= 0:
                out[i] = self[r]
        return out
