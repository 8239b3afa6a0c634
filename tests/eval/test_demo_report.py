"""The demo's report (``python -m mmcap.eval.demo_report``): captions of the held-out demo
images in every language with and without the prefix, and the two PNGs, on a tiny converted
checkpoint and hand-written metrics / CE files; bad metrics files name the line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmcap.data.demo import load_demo_texts
from mmcap.data.prompts import LANGS, ZERO_SHOT_PREFIXES
from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.eval.demo_report import main, read_metrics
from mmcap.testing.hf_models import tiny_florence2
from tools.convert_from_hf import main as convert_from_hf


def _metrics(path):
    lines = [{"step": s, "loss": 7.0 - s / 50, "lr": 1e-3} for s in range(25, 301, 25)]
    lines += [
        {"step": s, "eval/SC": 6 - s / 100, "eval/UC": 6.5 - s / 200, "eval/ST": 5.5 - s / 90}
        for s in (50, 100, 150, 200, 250, 300)
    ]
    lines.append({"step": 150, "loss": 4.0})  # the resumed job logs step 150 again: later wins
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _ce(path):
    keys = {
        k: {"ce": 3.0 + i / 4, "samples": 6, "tokens": 60}
        for i, k in enumerate(
            [
                "caption-de",
                "caption-en",
                "caption-es",
                "caption-zh",
                "translation-es",
                "translation-zh",
            ]
        )
    }
    splits = {
        s: {"ce": 3.2 + i / 3, "samples": 12, "tokens": 120, "keys": []}
        for i, s in enumerate(["SC", "UC", "ST", "mean"])
    }
    path.write_text(json.dumps({"splits": splits, "keys": keys, "samples": []}))
    return path


def test_report_writes_captions_and_plots(tmp_path, capsys, single_rank_parallel_state):
    tiny_florence2(0, image_token_id=999).save_pretrained(tmp_path / "florence")
    build_tiny_bart_tokenizer(tmp_path / "florence")
    gtok = build_tiny_gemma_tokenizer(tmp_path / "gemma_tok")
    assert (
        convert_from_hf(
            [
                "--florence",
                str(tmp_path / "florence"),
                "--gemma-tokenizer",
                str(gtok),
                "--image-size",
                "64",
                "--out",
                str(tmp_path / "ck"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "report"
    rc = main(
        [
            "--ckpt",
            str(tmp_path / "ck"),
            "--metrics",
            str(_metrics(tmp_path / "m.jsonl")),
            "--ce",
            str(_ce(tmp_path / "ce.json")),
            "--out",
            str(out),
            "--beams",
            "1",
            "--max-new-tokens",
            "6",
        ]
    )
    assert rc == 0
    held_out = [im for im in load_demo_texts()[0] if im.split == "eval"]
    rows = json.loads((out / "captions.json").read_text())
    assert len(rows) == len(held_out) * len(LANGS) * 2
    assert {(r["lang"], r["seen"]) for r in rows} == {(x, x in ("en", "de")) for x in LANGS}
    de = next(r for r in rows if r["image"] == held_out[0].key and r["lang"] == "de")
    assert de["reference"] == held_out[0].caption["de"]
    md = (out / "captions.md").read_text()
    assert capsys.readouterr().out == md
    assert all(f"### {im.key}" in md for im in held_out)
    assert f"[{ZERO_SHOT_PREFIXES['zh']}]" in md and "| zh (unseen) |" in md
    for png in ("loss_curve.png", "ce_per_split.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] >= 600


def test_metrics_reader(tmp_path):
    steps = read_metrics(_metrics(tmp_path / "m.jsonl"))
    assert steps[150]["loss"] == 4.0 and steps[150]["eval/SC"] == pytest.approx(4.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\n{"loss": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a metrics record"):
        read_metrics(bad)
    from mmcap.eval.demo_report import plot_loss_curve

    (tmp_path / "noloss.jsonl").write_text('{"step": 1, "eval/SC": 2}\n')
    with pytest.raises(ValueError, match="no 'loss' records"):
        plot_loss_curve(tmp_path / "noloss.jsonl", tmp_path / "x.png")
