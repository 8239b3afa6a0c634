"""Aggregation of per-sample CE (sample-weighted, per key and per paper split) checked by hand,
the JSON shape, and the atomic write."""

import json
import math

import pytest

from mmcap.eval.results import SPLITS, EvalResult, SampleLoss, aggregate, write_results


def _s(row, key, ce, tokens, rid="r"):
    task, lang = key.split("-")
    return SampleLoss(id=rid, task=task, lang=lang, ce=ce, tokens=tokens, row=row)


SAMPLES = [
    _s(4, "caption-en", 2.0, 10),
    _s(1, "caption-en", 4.0, 2),  # short sample: counts as much as the long one
    _s(2, "caption-de", 3.0, 5),
    _s(0, "caption-zh", 6.0, 7),
    _s(3, "translation-zh", 1.5, 4),
    _s(5, "translation-es", 2.5, 4),
    _s(6, "translation-de", 9.0, 3),  # in no split
    _s(7, "caption-fr", 8.0, 3),  # in no split
]


def test_splits_are_sample_weighted_means_by_hand():
    keys, splits = aggregate(SAMPLES)
    assert keys["caption-en"] == {"ce": 3.0, "samples": 2, "tokens": 12}  # not (20+8)/12
    assert keys["translation-de"] == {"ce": 9.0, "samples": 1, "tokens": 3}
    assert set(keys) == {s.key for s in SAMPLES}
    # SC = caption en + de: (2 + 4 + 3) / 3 samples.
    assert splits["SC"]["ce"] == pytest.approx(3.0) and splits["SC"]["samples"] == 3
    assert splits["SC"]["tokens"] == 17
    # UC = caption es + zh: only the zh sample.
    assert splits["UC"] == {
        "ce": 6.0,
        "samples": 1,
        "tokens": 7,
        "keys": ["caption-es", "caption-zh"],
    }
    # ST = translation es + zh: (1.5 + 2.5) / 2; translation-de is not in ST.
    assert splits["ST"]["ce"] == pytest.approx(2.0) and splits["ST"]["samples"] == 2
    # mean = the six held-out sets: (2 + 4 + 3 + 6 + 1.5 + 2.5) / 6; de/fr keys left out.
    assert splits["mean"]["ce"] == pytest.approx(19.0 / 6) and splits["mean"]["samples"] == 6
    assert splits["mean"]["tokens"] == 10 + 2 + 5 + 7 + 4 + 4


def test_split_membership_is_the_papers():
    assert SPLITS == {
        "SC": ("caption-en", "caption-de"),
        "UC": ("caption-es", "caption-zh"),
        "ST": ("translation-es", "translation-zh"),
        # official summarize_results "mean" over its six eval sets
        "mean": (
            "caption-en",
            "caption-de",
            "caption-es",
            "caption-zh",
            "translation-es",
            "translation-zh",
        ),
    }


def test_empty_split_has_no_ce():
    _, splits = aggregate([_s(0, "caption-en", 1.0, 3)])
    assert splits["UC"]["ce"] is None and splits["UC"]["samples"] == 0
    assert splits["SC"]["ce"] == 1.0


def test_json_shape_order_and_atomic_write(tmp_path):
    result = EvalResult(SAMPLES)
    assert [s.row for s in result.samples] == list(range(8))  # sorted by dataset row
    out = write_results(result, tmp_path / "sub" / "r.json", meta={"ckpt": "x"})
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temp file left
    obj = json.loads(out.read_text())
    assert set(obj) == {"splits", "keys", "samples", "meta"}
    assert set(obj["splits"]) == {"SC", "UC", "ST", "mean"}
    assert "compute" not in obj
    out = write_results(result, tmp_path / "c.json", compute={"model_macs": 3})
    obj = json.loads(out.read_text())
    assert obj["compute"] == {"model_macs": 3} and "meta" not in obj
    assert obj["samples"][0] == {
        "id": "r",
        "task": "caption",
        "lang": "zh",
        "ce": 6.0,
        "tokens": 7,
        "row": 0,
    }
    assert obj["splits"]["SC"]["ce"] == pytest.approx(3.0)


def test_non_finite_ce_is_written_as_null(tmp_path):
    result = EvalResult([_s(0, "caption-en", math.nan, 3), _s(1, "caption-de", 1.0, 3)])
    obj = json.loads(write_results(result, tmp_path / "r.json").read_text())
    assert obj["samples"][0]["ce"] is None and obj["samples"][1]["ce"] == 1.0
    assert obj["splits"]["SC"]["ce"] is None and obj["splits"]["SC"]["samples"] == 2
