"""tools/eval_downstream.py end to end on a tiny converted checkpoint and fake datasets in the
official layouts: every task of ``full`` runs, an absent dataset and an undecodable image are
counted skips, a rerun is served from the prediction caches, an interrupted task resumes at its
last batch, an empty prediction is scored; the exported HF model gives the mmcap checkpoint's
CoMMuTE sentence scores."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.eval.downstream import TASK_SETS
from mmcap.eval.downstream import datasets as ds
from mmcap.eval.downstream.model import DownstreamModel
from mmcap.testing.downstream_data import write_downstream_datasets
from mmcap.testing.hf_models import tiny_florence2
from tools.convert_from_hf import main as convert_from_hf
from tools.convert_to_hf import main as convert_to_hf
from tools.eval_downstream import main as eval_downstream

GEN = [
    "--beams",
    "1",
    "--max-new-tokens",
    "6",
    "--batch-size",
    "2",
    "--no-meteor",
    "--text-rows-only",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory, single_rank_parallel_state):
    d = tmp_path_factory.mktemp("eval_tool")
    tiny_florence2(0, image_token_id=999).save_pretrained(d / "florence")
    build_tiny_bart_tokenizer(d / "florence")
    gtok = build_tiny_gemma_tokenizer(d / "gemma_tok")
    args = ["--florence", str(d / "florence"), "--gemma-tokenizer", str(gtok)]
    assert convert_from_hf([*args, "--image-size", "64", "--out", str(d / "ck")]) == 0
    root = write_downstream_datasets(d / "data", n=3)
    (root / "coco/annotations/coco_karpathy.json").unlink()  # absent dataset: task skipped
    (root / "xm3600/images").glob("*.jpg").__next__().write_bytes(b"not a jpeg")
    return d, root


def _run(d, root, out, *extra):
    return eval_downstream(
        ["--ckpt", str(d / "ck"), "--data-root", str(root), "--out", str(out), *GEN, *extra]
    )


def _metrics(out):
    res = json.loads((out / "eval_results.json").read_text())
    return {r["task"]: {k: v for k, v in r.items() if k != "seconds"} for r in res["results"]}, res


def test_full_set_end_to_end_with_counted_skips_and_resume(work, tmp_path, capsys, monkeypatch):
    d, root = work
    out = tmp_path / "out"
    assert _run(d, root, out) == 0
    table = capsys.readouterr().out
    first, res = _metrics(out)
    names = [t.name for t in TASK_SETS["full"]]
    assert list(first) == [n for n in names if n != "coco_karpathy_caption"]
    assert "coco_karpathy.json" in res["skipped_tasks"]["coco_karpathy_caption"]
    assert "Skipped tasks (1)" in table and "| commute_lexical_ambiguity_zh | 3 |" in table
    for lang in ds.XM3600_LANGS:
        r = first[f"xm3600_caption_{lang}"]
        assert (r["samples"], r["skipped_images"]) == (2, 1)
        assert r["skipped_image_files"][0].endswith(".jpg")
    m = first["multi30k_caption_test_2016_de"]
    assert {"BLEU_4", "CIDEr", "SacreBLEU", "SacreBLEU_official_first5"} <= set(m)
    assert m["skipped_metrics"]["cocoMETEOR"] == "--no-meteor"
    assert 0 <= first["commute_lexical_ambiguity_de"]["accuracy"] <= 100
    assert res["meta"]["beams"] == 1 and res["meta"]["image_size"] == 64

    # A rerun is served from the caches: the model is never asked.
    def boom(*a, **k):
        raise AssertionError("the model ran although every prediction was cached")

    for name in ("caption", "translate", "sentence_scores"):
        monkeypatch.setattr(DownstreamModel, name, boom)
    assert _run(d, root, out) == 0
    assert _metrics(out)[0] == first
    monkeypatch.undo()

    # An interrupted task (cache of its first batch only) resumes at its last batch; an
    # empty cached prediction is scored as empty and counted.
    cache_f = out / "preds_translation_commute_fr.json"
    cache = json.loads(cache_f.read_text())
    full_preds = cache["predictions"]
    cache.update(ids=cache["ids"][:2], predictions=["", full_preds[1]], complete=False)
    cache_f.write_text(json.dumps(cache))
    asked = []
    orig = DownstreamModel.translate
    monkeypatch.setattr(
        DownstreamModel,
        "translate",
        lambda self, s, i, lang: asked.append(len(s)) or orig(self, s, i, lang),
    )
    assert _run(d, root, out, "--tasks", "commute_translation_fr") == 0
    assert asked == [1]
    cache = json.loads(cache_f.read_text())
    assert cache["predictions"] == ["", *full_preds[1:]] and cache["complete"]
    assert _metrics(out)[0]["commute_translation_fr"]["empty_predictions"] == 1


def test_bad_inputs_are_clear_errors(work, tmp_path, capsys):
    d, root = work
    out = tmp_path / "out"
    assert _run(d, root, out, "--tasks", "commute_translation_de") == 0
    capsys.readouterr()
    # Other generation settings than the cache's: an error naming the cache.
    assert _run(d, root, out, "--tasks", "commute_translation_de", "--use-prefix") == 2
    err = capsys.readouterr().err
    assert "preds_translation_commute_de.json" in err and "use_prefix" in err
    # A task named explicitly whose dataset is absent: an error naming the file.
    assert _run(d, root, out, "--tasks", "coco_karpathy_caption") == 2
    assert "coco_karpathy.json" in capsys.readouterr().err
    assert _run(d, root, out, "--tasks", "xm3600") == 2
    assert "unknown task or set 'xm3600'" in capsys.readouterr().err
    empty = tmp_path / "empty_root"
    empty.mkdir()
    assert _run(d, empty, tmp_path / "o2", "--tasks", "ambiguity") == 2
    assert "no task was evaluated" in capsys.readouterr().err


def test_hf_export_scores_commute_like_the_checkpoint(work):
    from mmcap.generate.pipeline import generation_config, load_pipeline

    d, root = work
    if not (d / "hf").exists():
        assert convert_to_hf(["--ckpt", str(d / "ck"), "--out", str(d / "hf")]) == 0
    samples = ds.commute(root, "ru")[:2]
    args = (
        [s.source for s in samples],
        [str(s.image) for s in samples],
        "ru",
        [s.incorrect for s in samples],
    )
    cfg = generation_config(1, 4)
    ck = DownstreamModel(load_pipeline(d / "ck"), cfg).sentence_scores(*args)
    hf = DownstreamModel(load_pipeline(d / "hf"), cfg).sentence_scores(*args)
    assert ck.shape == (2,) and torch.isfinite(ck).all()
    torch.testing.assert_close(hf, ck, rtol=1e-4, atol=1e-4)
    shutil.rmtree(d / "hf")
