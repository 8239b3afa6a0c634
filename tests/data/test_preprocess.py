"""Preprocessing: official tars and JSONL read back exactly; bad records counted per reason."""

import json
import random

import numpy as np

from mmcap.data.config import PreprocessConfig
from mmcap.data.indexed import TASK_TOKENS, CaptionDataset
from mmcap.data.preprocess import preprocess
from mmcap.data.prompts import ALL_KEYS, build_prompt
from mmcap.data.testing import (
    make_jpeg,
    make_png,
    synthetic_entries,
    write_jsonl,
    write_official_tar,
)


def _official_shards(root, n_shards=2, per_shard=5, seed=0):
    """Official-format tars from real JPEGs; returns {(shard, key): (jpg, entries)}."""
    rng = random.Random(seed)
    truth = {}
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            jpg = make_jpeg(seed * 1000 + s * 100 + i, size=(40 + 7 * i, 30 + 5 * s))
            keys = rng.sample(
                [
                    "caption-en",
                    "caption-de",
                    "translation-de",
                    "translation-fr",
                    "translation-es",
                    "translation-zh",
                    "translation-ru",
                ],
                k=rng.randint(1, 5),
            )
            entries = synthetic_entries(rng, keys)
            samples.append((key, jpg, json.dumps(entries, ensure_ascii=False).encode()))
            truth[(s, key)] = (jpg, entries)
        write_official_tar(root / f"shard-{s:03d}.tar", samples)
    return truth


def test_official_tars_read_back_exact(tmp_path, tiny_tokenizers, loaded_tokenizers):
    gemma, bart = tiny_tokenizers
    target, prompt = loaded_tokenizers
    truth = _official_shards(tmp_path)
    manifest = preprocess(
        [str(tmp_path / "shard-*.tar")], gemma, bart, str(tmp_path / "out"), show_progress=False
    )
    ds = CaptionDataset(tmp_path / "out")
    n_entries = sum(len(e) for _, e in truth.values())
    assert len(ds) == n_entries and ds.num_groups == len(truth) == manifest["counts"]["images"]
    seen = set()
    for i in range(len(ds)):
        t = ds.trace(i)
        shard = int(t["source"].rsplit("-", 1)[1][:3])
        jpg, entries = truth[(shard, t["record_id"])]
        raw = entries[t["entry"]]
        seen.add((shard, t["record_id"], t["entry"]))
        assert t["key"] == f"{raw['type']}-{raw['lang']}"
        assert TASK_TOKENS[ds.entries["task"][i]] in raw["prompt"]
        np.testing.assert_array_equal(
            ds.prompt_ids(i), prompt.encode([build_prompt(raw["prompt"])])[0]
        )
        np.testing.assert_array_equal(ds.target_ids(i), target.encode([raw["output"]])[0])
        assert prompt.decode(ds.prompt_ids(i)) == build_prompt(raw["prompt"])
        assert target.decode(ds.target_ids(i)) == raw["output"]
        assert ds.image_bytes(int(ds.entries["image"][i])) == jpg  # the original JPEG bytes
    assert len(seen) == n_entries  # every entry once
    for g in range(ds.num_groups):  # one group = one image with all its entries
        rows = ds.group_entries(g)
        assert len(set(ds.entries["image"][rows].tolist())) == 1
        assert len({ds.record_id(r) for r in rows}) == 1
    # Manifest: tokenizer hashes, per-key counts and official tok_counts statistics.
    assert manifest["tokenizers"]["target"]["sha256"] == target.content_hash
    assert manifest["tokenizers"]["prompt"]["sha256"] == prompt.content_hash
    keys = np.bincount(ds.entries["key"], minlength=len(ALL_KEYS))
    assert manifest["per_key"] == {k: int(keys[j]) for j, k in enumerate(ALL_KEYS) if keys[j]}
    stats = manifest["token_stats"]
    for j, k in enumerate(ALL_KEYS):
        task, lang = k.split("-")
        rows = np.nonzero(ds.entries["key"] == j)[0]
        if not len(rows):
            continue
        t_len = [len(ds.target_ids(r)) for r in rows]
        p_len = [len(ds.prompt_ids(r)) for r in rows]
        assert stats["sample_count"][task][lang] == len(rows)
        assert stats["total_output_count"][task][lang] == sum(t_len)
        assert stats["max_output_count"][task][lang] == max(t_len)
        assert stats["total_prompt_count"][task][lang] == sum(p_len)
        assert stats["max_prompt_count"][task][lang] == max(p_len)
    assert sum(manifest["rejects"].values()) == 0
    assert (tmp_path / "out/rejects.jsonl").read_text() == ""
    assert not (tmp_path / "out.partial").exists()


def _bad_inputs(root):
    """Tar + JSONL fixtures with bad items of every reason; returns (paths, expected counts)."""
    rng = random.Random(5)
    good = synthetic_entries(rng, ["caption-en", "translation-de"])
    data = json.dumps(good).encode()
    long_tokens = "😀" * 120  # < max_text_chars chars, but > max_target_tokens byte tokens
    mixed = [
        good[0],  # kept
        {"type": "caption", "lang": "de", "prompt": "<LANG_DE><CAPTION>"},  # missing output
        {"type": "caption", "lang": "de", "prompt": "<LANG_DE><CAPTION>", "output": "  "},  # empty
        {"type": "caption", "lang": "de", "prompt": "<LANG_DE><CAPTION>", "output": "a\ud800b"},
        {"type": "caption", "lang": "en", "prompt": "<LANG_EN><CAPTION>", "output": "x" * 600},
        {"type": "caption", "lang": "it", "prompt": "<LANG_DE><CAPTION>", "output": "ciao"},
        {"type": "caption", "lang": "en", "prompt": "<OD>", "output": "a dog"},
        {"type": "translation", "lang": "fr", "prompt": "<LANG_FR><TRANSLATE> ", "output": "chien"},
        {"type": "caption", "lang": "en", "prompt": "<LANG_EN><CAPTION>", "output": long_tokens},
        {"type": "translation", "lang": "en", "prompt": "<LANG_DE><TRANSLATE>x", "output": "y"},
        "not an object",
    ]
    tar = write_official_tar(
        root / "bad.tar",
        [
            ("ok", make_jpeg(1), data),  # 2 kept
            ("png", make_png(2), data),  # bad_image
            ("trunc", make_jpeg(3, size=(120, 90))[:300], data),  # bad_image
            ("nodata", make_jpeg(4), None),  # missing_field
            ("nojpg", None, data),  # missing_field
            ("utf8", make_jpeg(5), b"\xff\xfe[]"),  # bad_utf8
            ("json", make_jpeg(6), b"[{'type': 1"),  # bad_json
            ("empty", make_jpeg(7), b"[]"),  # missing_field
            ("mixed", make_jpeg(8), json.dumps(mixed).encode()),  # 1 kept, 10 rejected
        ],
    )
    (root / "img").mkdir()
    (root / "img/a.jpg").write_bytes(make_jpeg(9))
    (root / "img/b.png").write_bytes(make_png(10))
    cap = {"type": "caption", "lang": "en", "prompt": "<LANG_EN><CAPTION>", "output": "A cat."}
    tr = {
        "type": "translation",
        "lang": "zh",
        "prompt": "<LANG_ZH><TRANSLATE>A cat.",
        "output": "猫。",
    }
    jsonl = write_jsonl(
        root / "bad.jsonl",
        [
            {**cap, "image": "img/a.jpg", "id": "c1"},  # kept
            {**tr, "image": "img/a.jpg"},  # kept, same image -> same group
            tr,  # kept, no image
            b"\xc3\x28 not utf8",  # bad_utf8
            b"{not json",  # bad_json
            cap,  # caption without image: missing_field
            {**cap, "image": "img/missing.jpg"},  # bad_image
            {**cap, "image": "img/b.png"},  # bad_image
            {**cap, "output": ""},  # empty_text
            {**cap, "image": 7},  # missing_field (wrong type)
        ],
    )
    # A tar cut in the middle: the samples before the cut are kept, the rest is bad_archive.
    whole = write_official_tar(
        root / "whole.tar", [(f"t{i}", make_jpeg(20 + i), data) for i in range(4)]
    )
    cut = root / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    whole.unlink()
    expected = {
        "bad_image": 4,
        "missing_field": 6,
        "bad_json": 3,
        "bad_utf8": 3,
        "empty_text": 3,
        "too_long": 2,
        "bad_task": 3,
        "bad_archive": 1,
    }
    return [str(tar), str(jsonl), str(cut)], expected


def test_bad_records_counted_per_reason(tmp_path, tiny_tokenizers):
    gemma, bart = tiny_tokenizers
    inputs, expected = _bad_inputs(tmp_path)
    cfg = PreprocessConfig(max_text_chars=500, max_target_tokens=100)
    manifest = preprocess(inputs, gemma, bart, str(tmp_path / "out"), cfg, show_progress=False)
    assert manifest["rejects"] == expected
    rejects = [json.loads(x) for x in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(expected.values())
    named = {
        (r["source"].rsplit("/", 1)[1], r["record"], r["entry"], r["field"], r["reason"])
        for r in rejects
    }
    for item in [
        ("bad.tar", "png", None, "jpg", "bad_image"),
        ("bad.tar", "nojpg", None, "jpg", "missing_field"),
        ("bad.tar", "mixed", 1, "output", "missing_field"),
        ("bad.tar", "mixed", 3, "output", "bad_utf8"),
        ("bad.tar", "mixed", 8, "output", "too_long"),
        ("bad.tar", "mixed", 6, "prompt", "bad_task"),
        ("bad.jsonl", "line 4", None, "line", "bad_utf8"),
        ("bad.jsonl", "line 7", None, "image", "bad_image"),
        ("bad.jsonl", "line 6", None, "image", "missing_field"),
    ]:
        assert item in named, item
    assert any(r["reason"] == "bad_archive" and r["source"].endswith("cut.tar") for r in rejects)
    ds = CaptionDataset(tmp_path / "out")
    kept = {(ds.trace(i)["source"].rsplit("/", 1)[1], ds.record_id(i)) for i in range(len(ds))}
    cut_kept = {k for s, k in kept if s == "cut.tar"}
    assert cut_kept and cut_kept < {"t0", "t1", "t2", "t3"}  # nothing valid before the cut lost
    tar_jsonl = [k for k in kept if k[0] != "cut.tar"]
    assert sorted(tar_jsonl) == sorted(
        [
            ("bad.tar", "ok"),
            ("bad.tar", "mixed"),
            ("bad.jsonl", "c1"),
            ("bad.jsonl", "2"),
            ("bad.jsonl", "3"),
        ]
    )
    assert manifest["counts"]["entries"] == 2 + 1 + 3 + 2 * len(cut_kept)
    # JSONL: lines sharing an image share its row and sampling group; text-only has none.
    rows = {ds.record_id(i): i for i in range(len(ds)) if ds.trace(i)["source"].endswith(".jsonl")}
    e = ds.entries
    assert e["image"][rows["c1"]] == e["image"][rows["2"]] >= 0
    assert e["group"][rows["c1"]] == e["group"][rows["2"]]
    assert e["image"][rows["3"]] == -1 and e["group"][rows["3"]] != e["group"][rows["c1"]]
    assert ds.trace(rows["3"])["record"] == 3  # JSONL record number = line number
