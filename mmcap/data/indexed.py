"""On-disk caption datasets in megatron-core's indexed (``.bin``/``.idx``) format.

A dataset directory holds:

- ``prompts``  : BART prompt ids per entry (uint16 when the vocabulary fits, else int32);
- ``targets``  : Gemma target ids per entry (int32; ``<bos> ... <eos>``);
- ``images``   : raw JPEG bytes, one uint8 record per image;
- ``ids``      : the source record's id per entry (UTF-8 bytes: tar key or JSONL ``id``);
- ``entries.npy``: one :data:`ENTRY_DTYPE` row per entry (same row as prompts/targets):
  task-language key, task token, sampling group, image row (-1: none), source file,
  record number and entry index in that record;
- ``group_offsets.npy`` (+ ``group_order.npy`` when entries are not stored group by group):
  the entries of each sampling group (an image with all its entries, or one image-less entry);
- ``manifest.json`` (written last: a directory without it is not a dataset) and
  ``rejects.jsonl`` (every skipped record, see :mod:`mmcap.data.preprocess`).

Shards are written with megatron-core's ``IndexedDatasetBuilder`` and concatenated with its
index writer (byte-identical to the builder's ``add_index``); everything is read with its
``IndexedDataset``; token slices on the hot path come from a flat ``np.memmap`` of the
same ``.bin`` using megatron's index arrays (no per-item Python object churn).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    _IndexReader,
    _IndexWriter,
)

from mmcap.data.prompts import ALL_KEYS, CAPTION_TOKENS, TRANSLATE_TOKEN

FORMAT = "mmcap-caption-v1"
MANIFEST = "manifest.json"
STORES = ("prompts", "targets", "images", "ids")
# Task token ids stored in entries["task"].
TASK_TOKENS: tuple[str, ...] = (*CAPTION_TOKENS, TRANSLATE_TOKEN)
ENTRY_DTYPE = np.dtype(
    [
        ("key", "u1"),  # index into prompts.ALL_KEYS ("caption-en", ...)
        ("task", "u1"),  # index into TASK_TOKENS
        ("group", "<i8"),  # sampling group
        ("image", "<i8"),  # row in images, -1 = no image
        ("source", "<i4"),  # index into manifest["sources"]
        ("record", "<i8"),  # tar: sample ordinal (0-based); JSONL: line number (1-based)
        ("entry", "<i4"),  # tar: index in the .data list; JSONL: 0
    ]
)


def store_dtypes(prompt_vocab_size: int) -> dict[str, type]:
    """Item dtype of each store; prompts fit uint16 for BART's 51,289 tokens."""
    fits16 = prompt_vocab_size <= np.iinfo(np.uint16).max + 1
    return {
        "prompts": np.uint16 if fits16 else np.int32,
        "targets": np.int32,
        "images": np.uint8,
        "ids": np.uint8,
    }


class ShardWriter:
    """Writes one dataset (or one shard of it) with megatron-core builders.

    Args:
        directory: output folder (created).
        prompt_vocab_size: BART vocabulary size, picks the prompt dtype.
        source: source index stored in every entry of this shard.
    """

    def __init__(self, directory: str | Path, prompt_vocab_size: int, source: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtypes = store_dtypes(prompt_vocab_size)
        self.builders = {
            n: IndexedDatasetBuilder(str(self.dir / f"{n}.bin"), dtype=d)
            for n, d in self.dtypes.items()
        }
        self.source = source
        self.rows: list[tuple] = []
        self.num_images = 0
        self.num_groups = 0

    def _add(self, store: str, arr: np.ndarray | bytes) -> None:
        """One item = one megatron "document" (document_indices[-1] must equal the count)."""
        if isinstance(arr, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(bytearray(arr), dtype=np.uint8)
        self.builders[store].add_item(torch.from_numpy(np.ascontiguousarray(arr)))
        self.builders[store].end_document()

    def add_image(self, jpeg: bytes) -> int:
        """Store JPEG bytes; returns the image row."""
        self._add("images", jpeg)
        self.num_images += 1
        return self.num_images - 1

    def new_group(self) -> int:
        self.num_groups += 1
        return self.num_groups - 1

    def add_entry(
        self,
        prompt_ids: np.ndarray,
        target_ids: np.ndarray,
        record_id: str,
        *,
        key: int,
        task: int,
        group: int,
        image: int,
        record: int,
        entry: int,
    ) -> None:
        self._add("prompts", prompt_ids)
        self._add("targets", target_ids)
        self._add("ids", record_id.encode("utf-8"))
        self.rows.append((key, task, group, image, self.source, record, entry))

    def finalize(self) -> None:
        for name, b in self.builders.items():
            b.finalize(str(self.dir / f"{name}.idx"))
        entries = np.array(self.rows, dtype=ENTRY_DTYPE)
        np.save(self.dir / "entries.npy", entries)
        write_group_index(self.dir, entries["group"], self.num_groups)
        counts = {
            "entries": len(entries),
            "groups": self.num_groups,
            "images": self.num_images,
            "dtypes": {n: np.dtype(d).name for n, d in self.dtypes.items()},
        }
        (self.dir / "shard.json").write_text(json.dumps(counts))


def write_group_index(directory: Path, groups: np.ndarray, num_groups: int) -> None:
    """group_offsets.npy (and group_order.npy if entries are not grouped contiguously)."""
    counts = np.bincount(groups, minlength=num_groups) if len(groups) else np.zeros(num_groups, int)
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    np.save(directory / "group_offsets.npy", offsets)
    order_file = directory / "group_order.npy"
    if len(groups) and np.any(np.diff(groups) < 0):
        np.save(order_file, np.argsort(groups, kind="stable").astype(np.int64))
    elif order_file.exists():
        order_file.unlink()


class _IndexWriterNp(_IndexWriter):
    """megatron-core's .idx writer with its per-sequence Python pointer loop vectorised
    (same bytes; the loop costs minutes at 10^8 sequences)."""

    def _sequence_pointers(self, sequence_lengths) -> np.ndarray:
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        return pointers


def concat_stores(prefixes: list[str], out_prefix: str, dtype) -> None:
    """Concatenate indexed datasets (what megatron's ``IndexedDatasetBuilder.add_index`` does,
    without its per-call ``gc.collect()`` (0.25 s with torch loaded, i.e. hours over 10^4
    shards) and without growing Python lists of every sequence length)."""
    lengths, docs, n = [], [np.zeros(1, np.int64)], 0
    with open(out_prefix + ".bin", "wb") as out:
        for prefix in prefixes:
            index = _IndexReader(prefix + ".idx", multimodal=False)
            if np.dtype(index.dtype) != np.dtype(dtype):
                raise ValueError(
                    f"{prefix}: dtype {index.dtype} != {dtype}; shards of one "
                    "dataset must share their tokenizers"
                )
            lengths.append(np.asarray(index.sequence_lengths, np.int64))
            docs.append(np.asarray(index.document_indices[1:], np.int64) + n)
            n += len(index.sequence_lengths)
            del index
            with open(prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    with _IndexWriterNp(out_prefix + ".idx", dtype) as w:
        w.write(
            np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
            None,
            np.concatenate(docs),
        )


def merge_shards(shards: list[Path], out_dir: Path) -> dict:
    """Concatenate shard datasets into ``out_dir``; returns counts.

    Entry ``group``/``image`` columns are offset by the groups/images of earlier shards.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = [json.loads((s / "shard.json").read_text()) for s in shards]
    dtypes = infos[0]["dtypes"] if infos else {n: "uint8" for n in STORES}
    for name in STORES:
        concat_stores(
            [str(s / name) for s in shards], str(out_dir / name), getattr(np, dtypes[name])
        )
    parts, n_groups, n_images = [], 0, 0
    for s, info in zip(shards, infos):
        e = np.load(s / "entries.npy")
        e["group"] += n_groups
        e["image"][e["image"] >= 0] += n_images
        parts.append(e)
        n_groups += info["groups"]
        n_images += info["images"]
    entries = np.concatenate(parts) if parts else np.zeros(0, ENTRY_DTYPE)
    np.save(out_dir / "entries.npy", entries)
    write_group_index(out_dir, entries["group"], n_groups)
    return {"entries": len(entries), "groups": n_groups, "images": n_images}


class _TokenStore:
    """Zero-copy token access: megatron's index arrays over a flat memmap of the .bin."""

    def __init__(self, prefix: str):
        if Path(prefix + ".bin").stat().st_size == 0:
            # megatron's reader cannot mmap an empty .bin (e.g. no images in a text-only set).
            self.indexed, self.dtype = None, np.dtype(np.uint8)
            self.lengths = self.starts = np.zeros(0, np.int64)
            self.flat = np.zeros(0, self.dtype)
            return
        self.indexed = IndexedDataset(prefix)
        index = self.indexed.index
        self.dtype = np.dtype(index.dtype)
        self.lengths = index.sequence_lengths
        self.starts = index.sequence_pointers // self.dtype.itemsize
        if len(self.lengths):
            # A truncated .bin would turn every item after the cut into garbage (or a counted
            # blank image): check its size against the index once, at open.
            need = int(index.sequence_pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize
            have = Path(prefix + ".bin").stat().st_size
            if have < need:
                raise ValueError(
                    f"{prefix}.bin: {have} bytes, but its index needs {need} (truncated or "
                    "partly copied); copy the dataset again or rerun tools/preprocess_data.py"
                )
        # Plain ndarray view: slicing an np.memmap subclass costs ~1 us more per item.
        self.flat = np.memmap(prefix + ".bin", dtype=self.dtype, mode="r").view(np.ndarray)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        s = self.starts[i]
        return self.flat[s : s + self.lengths[i]]


class CaptionDataset:
    """A preprocessed dataset directory, read with megatron-core's ``IndexedDataset``.

    Args:
        path: dataset directory (must hold a complete ``manifest.json``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a complete mmcap dataset (no {MANIFEST}); "
                "run tools/preprocess_data.py to (re)build it"
            )
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise ValueError(
                f"{manifest_file}: format {self.manifest.get('format')!r}, "
                f"expected a complete {FORMAT!r} dataset"
            )
        self.prompts = _TokenStore(str(self.path / "prompts"))
        self.targets = _TokenStore(str(self.path / "targets"))
        self.images = _TokenStore(str(self.path / "images"))
        self.ids = _TokenStore(str(self.path / "ids"))
        self.entries = np.load(self.path / "entries.npy", mmap_mode="r")
        self.group_offsets = np.load(self.path / "group_offsets.npy")
        order = self.path / "group_order.npy"
        self.group_order = np.load(order, mmap_mode="r") if order.exists() else None
        n = len(self.entries)
        if not (len(self.prompts) == len(self.targets) == len(self.ids) == n):
            raise ValueError(f"{self.path}: store lengths disagree with entries.npy ({n} rows)")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_groups(self) -> int:
        return len(self.group_offsets) - 1

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def group_entries(self, g: int) -> np.ndarray:
        """Entry rows of sampling group ``g``."""
        lo, hi = self.group_offsets[g], self.group_offsets[g + 1]
        return np.arange(lo, hi) if self.group_order is None else self.group_order[lo:hi]

    def prompt_ids(self, i: int) -> np.ndarray:
        return self.prompts[i]

    def target_ids(self, i: int) -> np.ndarray:
        return self.targets[i]

    def image_bytes(self, image_row: int) -> bytes:
        return self.images[image_row].tobytes()

    def record_id(self, i: int) -> str:
        return self.ids[i].tobytes().decode("utf-8")

    def trace(self, i: int) -> dict:
        """Where entry ``i`` came from: source file, record id/number, entry index, key."""
        e = self.entries[i]
        return {
            "source": self.manifest["sources"][int(e["source"])]["path"],
            "record_id": self.record_id(i),
            "record": int(e["record"]),
            "entry": int(e["entry"]),
            "key": ALL_KEYS[int(e["key"])],
            "task_token": TASK_TOKENS[int(e["task"])],
            "image": int(e["image"]),
        }
