"""Storage: write/read round trip, megatron-core's reader on our files, shard merging."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from mmcap.data.indexed import (
    ENTRY_DTYPE,
    STORES,
    ShardWriter,
    _TokenStore,
    concat_stores,
    merge_shards,
)


def _write_shard(path, rng, n_groups, source, vocab=51289):
    """A shard of random records; returns what was written, per entry and per image."""
    w = ShardWriter(path, prompt_vocab_size=vocab, source=source)
    written, images = [], []
    for _ in range(n_groups):
        g = w.new_group()
        jpeg = bytes(rng.integers(0, 256, rng.integers(1, 300), dtype=np.uint8))
        img = w.add_image(jpeg) if rng.random() < 0.8 else -1
        if img >= 0:
            images.append(jpeg)
        for j in range(rng.integers(1, 4)):
            p = rng.integers(0, vocab, rng.integers(1, 40))
            t = rng.integers(0, 256000, rng.integers(2, 60))
            rid = f"key-{g}-ü"
            w.add_entry(
                p,
                t,
                rid,
                key=int(rng.integers(0, 12)),
                task=int(rng.integers(0, 4)),
                group=g,
                image=img,
                record=g,
                entry=j,
            )
            written.append((p, t, rid, g, img))
    w.finalize()
    return written, images


def test_round_trip_and_megatron_reader(tmp_path):
    rng = np.random.default_rng(0)
    written, images = _write_shard(tmp_path / "s", rng, n_groups=30, source=3)
    # megatron-core's own reader opens every store and returns exactly what was written.
    prompts, targets = (
        IndexedDataset(str(tmp_path / "s/prompts")),
        IndexedDataset(str(tmp_path / "s/targets")),
    )
    ids, imgs = IndexedDataset(str(tmp_path / "s/ids")), IndexedDataset(str(tmp_path / "s/images"))
    assert prompts.index.dtype == np.uint16 and targets.index.dtype == np.int32
    assert len(prompts) == len(targets) == len(ids) == len(written)
    for i, (p, t, rid, _, _) in enumerate(written):
        np.testing.assert_array_equal(prompts[i], p)
        np.testing.assert_array_equal(targets[i], t)
        assert ids[i].tobytes().decode() == rid
    assert [imgs[i].tobytes() for i in range(len(imgs))] == images
    # Our zero-copy view agrees with megatron's reader item by item.
    store = _TokenStore(str(tmp_path / "s/targets"))
    for i in range(len(targets)):
        np.testing.assert_array_equal(store[i], targets[i])
    entries = np.load(tmp_path / "s/entries.npy")
    assert entries.dtype == ENTRY_DTYPE and (entries["source"] == 3).all()
    offsets = np.load(tmp_path / "s/group_offsets.npy")
    assert offsets[-1] == len(entries)
    for g in range(len(offsets) - 1):
        assert (entries["group"][offsets[g] : offsets[g + 1]] == g).all()


def test_megatron_written_store_reads_through_ours(tmp_path):
    """The other direction: a store written by megatron's builder directly (add_document)."""
    docs = [np.arange(n, dtype=np.int32) for n in (3, 1, 7)]
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(str(tmp_path / "m.idx"))
    store = _TokenStore(str(tmp_path / "m"))
    assert [store[i].tolist() for i in range(3)] == [d.tolist() for d in docs]


def test_merge_offsets_groups_and_images(tmp_path):
    rng = np.random.default_rng(1)
    parts = [
        _write_shard(tmp_path / f"s{i}", rng, n_groups=n, source=i) for i, n in enumerate((5, 0, 8))
    ]
    counts = merge_shards([tmp_path / f"s{i}" for i in range(3)], tmp_path / "m")
    written = [w for ws, _ in parts for w in ws]
    images = [im for _, ims in parts for im in ims]
    assert counts == {"entries": len(written), "groups": 13, "images": len(images)}
    targets = IndexedDataset(str(tmp_path / "m/targets"))
    imgs = IndexedDataset(str(tmp_path / "m/images"))
    entries = np.load(tmp_path / "m/entries.npy")
    # Image rows and groups were re-based: each entry still points at its own image bytes.
    k = 0
    g_base = 0
    for (ws, ims), n in zip(parts, (5, 0, 8)):
        for _, t, _, g, img in ws:
            np.testing.assert_array_equal(targets[k], t)
            assert entries["group"][k] == g + g_base
            if img >= 0:
                assert imgs[int(entries["image"][k])].tobytes() == ims[img]
            else:
                assert entries["image"][k] == -1
            k += 1
        g_base += n
    assert sorted(set(entries["source"].tolist())) == [0, 2]
    for name in STORES:
        assert (tmp_path / "m" / f"{name}.idx").exists()


def test_concat_is_byte_identical_to_megatron_add_index(tmp_path):
    rng = np.random.default_rng(2)
    prefixes = []
    for i, n in enumerate((4, 0, 9)):
        b = IndexedDatasetBuilder(str(tmp_path / f"p{i}.bin"), dtype=np.int32)
        for _ in range(n):  # documents of 1-3 sequences
            lengths = rng.integers(1, 20, rng.integers(1, 4)).tolist()
            b.add_document(rng.integers(0, 1000, sum(lengths)).astype(np.int32), lengths)
        prefixes.append(str(tmp_path / f"p{i}"))
        b.finalize(prefixes[-1] + ".idx")
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for p in prefixes:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    concat_stores(prefixes, str(tmp_path / "ours"), np.int32)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()


def test_shard_json_and_empty_store(tmp_path):
    w = ShardWriter(tmp_path / "e", prompt_vocab_size=70000)
    w.finalize()
    info = json.loads((tmp_path / "e/shard.json").read_text())
    assert info["entries"] == 0 and info["dtypes"]["prompts"] == "int32"
    assert len(_TokenStore(str(tmp_path / "e/images"))) == 0  # megatron cannot mmap empty files
    with pytest.raises(FileNotFoundError, match="not a complete mmcap dataset"):
        from mmcap.data.indexed import CaptionDataset

        CaptionDataset(tmp_path / "e")
