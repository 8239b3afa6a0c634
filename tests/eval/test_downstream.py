"""Downstream evaluation: dataset readers on fake datasets in the official layouts (and their
bad-input errors), task sets, metrics equal to the packages' own results, ambiguity accuracy
on a hand-made case, and tools/eval_downstream.py end to end on a tiny converted checkpoint
(counted skips, resume from cached predictions)."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from mmcap.eval.downstream import TASK_SETS, DatasetMissingError, select_tasks
from mmcap.eval.downstream import datasets as ds
from mmcap.eval.downstream.runner import DownstreamOptions, run_downstream
from mmcap.eval.downstream.scoring import score_task, xm3600_tokenize
from mmcap.eval.downstream_metrics import java_available
from mmcap.testing.downstream_data import write_downstream_datasets

SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [  # sacrebleu's README example: two reference streams, BLEU = 48.53
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_downstream_datasets(tmp_path_factory.mktemp("eval_data"), n=3)


def test_task_sets_are_the_official_ones():
    assert [len(TASK_SETS[k]) for k in ("translation", "caption", "ambiguity", "en_caption")] == [
        12,
        9,
        4,
        3,
    ]
    assert [t.name for t in TASK_SETS["full"]] == [
        t.name for k in ("translation", "caption", "ambiguity") for t in TASK_SETS[k]
    ]
    tasks, explicit = select_tasks("ambiguity,xm3600_caption_zh,commute_lexical_ambiguity_de")
    assert [t.name for t in tasks][-1] == "xm3600_caption_zh" and len(tasks) == 5
    assert explicit == {"xm3600_caption_zh", "commute_lexical_ambiguity_de"}
    with pytest.raises(ValueError, match="unknown task or set 'xm3600'"):
        select_tasks("xm3600")


def test_readers_follow_the_official_layouts(root):
    coco = ds.multi30k_task1(root, "test_2017_mscoco", "fr")
    assert coco[1].image == root / "coco/val2014/COCO_val2014_000000000001.jpg"  # '#1' cut
    assert coco[1].source and len(coco[1].references) == 1
    cap = ds.multi30k_task2(root, "de")
    assert len(cap) == 3 and all(len(s.references) == 5 for s in cap)
    with gzip.open(root / "multi30k/data/task2/raw/test_2016.4.de.gz", "rt") as f:
        assert cap[2].references[3] == f.read().splitlines()[2]
    kar = ds.coco_karpathy(root)
    assert len(kar) == 3 and {len(s.references) for s in kar} == {5, 6}  # train images left out
    com = ds.commute(root, "zh")
    assert com[0].incorrect and com[0].image.parent == root / "CoMMuTE/images"
    assert [len(s.references) for s in ds.xm3600(root, "ru")] == [2, 2, 2]


def test_bad_annotations_name_the_file(tmp_path):
    with pytest.raises(
        DatasetMissingError, match=r"missing file .*task1/raw/test_2018_flickr.en.gz"
    ):
        ds.multi30k_task1(tmp_path, "test_2018_flickr", "fr")
    d = tmp_path / "CoMMuTE/CoMMuTE/en-de"
    d.mkdir(parents=True)
    for name, n in [("img.order", 3), ("src.en", 3), ("correct.de", 3), ("incorrect.de", 2)]:
        (d / name).write_text("x\n" * n)
    with pytest.raises(ValueError, match=r"different line counts .*incorrect.de: 2"):
        ds.commute(tmp_path, "de")
    (tmp_path / "xm3600").mkdir()
    (tmp_path / "xm3600/captions.jsonl").write_text(
        '{"image/key": "a", "de": {"caption": ["x"]}}\n{"image/key": "b"}\n'
    )
    with pytest.raises(ValueError, match=r"captions.jsonl:2: field 'de.caption'"):
        ds.xm3600(tmp_path, "de")


def test_metrics_equal_the_packages():
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider

    got = score_task("translation", "en", SYS, [[r] for r in REFS[0]], SYS)
    assert got["SacreBLEU"] == sacrebleu.corpus_bleu(SYS, [REFS[0]]).score
    assert got["skipped_metrics"]["COMET"] == "no --comet-model given"
    assert got["skipped_metrics"]["METEOR"].startswith("no --meteor-jar")
    zh = score_task("translation", "zh", ["今天天气很好"], [["今天天气不错"]])
    assert (
        zh["SacreBLEU"]
        == sacrebleu.corpus_bleu(["今天天气很好"], [["今天天气不错"]], tokenize="zh").score
    )
    # XM3600 CIDEr: pycocoevalcap's Cider on the normalised tokens.
    hyps, refs = (
        ["Ein Hund läuft!", "图为一只狗。"],
        [["ein Hund rennt.", "Hund, läuft"], ["一只狗"]],
    )
    want = (
        Cider().compute_score(
            {0: ["ein hund rennt", "hund läuft"], 1: ["一 只 狗"]},
            {0: ["ein hund läuft"], 1: ["图 为 一 只 狗"]},
        )[0]
        * 100
    )
    assert xm3600_tokenize(hyps[1]) == "图 为 一 只 狗"
    assert score_task("xm3600", "zh", hyps, refs)["XM3600_CIDEr"] == pytest.approx(want)


def test_multi30k_caption_bleu_streams_and_official(monkeypatch):
    import sacrebleu

    from mmcap.eval import downstream_metrics as dm

    monkeypatch.setattr(dm, "java_available", lambda: False)  # pycocoevalcap part skipped
    refs = [[f"a photo of object {i} number {k} here" for k in range(5)] for i in range(7)]
    hyps = [f"a photo of object {i} number 0 here" for i in range(5)] + ["", "other words"]
    got = score_task("multi30k_caption", "en", hyps, refs)
    assert (
        got["SacreBLEU"]
        == got["SacreBLEU_streams"]
        == sacrebleu.corpus_bleu(hyps, [list(s) for s in zip(*refs)]).score
    )
    # Official: per-image lists taken as 7 "streams" of 5: hypothesis j (j < 5) is scored
    # against caption j of every image; hypotheses 5.. are never looked at.
    assert got["SacreBLEU_official_first5"] == sacrebleu.corpus_bleu(hyps, refs).score
    tail = score_task("multi30k_caption", "en", hyps[:5] + ["x y", "z"], refs)
    assert tail["SacreBLEU_official_first5"] == got["SacreBLEU_official_first5"]
    assert tail["SacreBLEU_streams"] != got["SacreBLEU_streams"]
    assert got["SacreBLEU_streams"] < 90
    assert "no Java" in next(iter(got["skipped_metrics"].values()))
    official = score_task("multi30k_caption", "en", hyps, refs, official_multi30k_bleu=True)
    assert official["SacreBLEU"] == official["SacreBLEU_official_first5"]


def test_comet_runs_only_when_installed_and_given(monkeypatch, tmp_path):
    from mmcap.eval.downstream import scoring

    monkeypatch.setattr(scoring, "comet_available", lambda: False)
    got = score_task("translation", "de", ["a"], [["a"]], ["a"], comet_model=str(tmp_path))
    assert got["skipped_metrics"]["COMET"] == "unbabel-comet is not installed"
    calls = []

    class FakeComet:  # stands in for the package: the wiring only
        def predict(self, data, batch_size, gpus):
            calls.append(data)
            return types.SimpleNamespace(system_score=0.25)

    fake = types.ModuleType("comet")
    fake.load_from_checkpoint = lambda path: calls.append(path) or FakeComet()
    monkeypatch.setitem(sys.modules, "comet", fake)
    monkeypatch.setattr(scoring, "comet_available", lambda: True)
    got = score_task(
        "translation", "de", ["ein Hund"], [["der Hund"]], ["a dog"], comet_model=str(tmp_path)
    )
    assert got["COMET"] == 25.0 and "COMET" not in got["skipped_metrics"]
    assert calls == [str(tmp_path), [{"src": "a dog", "mt": "ein Hund", "ref": "der Hund"}]]


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="METEOR needs Java")
def test_official_meteor_jar_groups_references_per_hypothesis():
    """The jar shipped with pycocoevalcap (English paraphrases only; ~20 s JVM + tables)."""
    from pycocoevalcap.meteor import meteor

    jar = str(Path(meteor.__file__).parent / "meteor-1.5.jar")
    refs = [
        ["a dog runs on the grass", "a brown dog running"],
        ["two cats sleep on a sofa", "cats sleeping"],
    ]
    hyps = ["a dog runs on the grass", "two cats sleep on a sofa"]
    # With the references grouped wrongly (by stream), the second hypothesis would have no
    # exact match and the score would be far lower.
    got = score_task("multi30k_caption", "en", hyps, refs, meteor=False, meteor_jar=jar)
    assert got["METEOR"] > 90


class _StubScorer:
    """Hand-made sentence CEs for the ambiguity unit test (no model)."""

    image_size = 32

    def __init__(self, ce: dict[str, float]):
        self.ce = ce

    def image_error(self, path):
        return None

    def sentence_scores(self, sources, images, lang, texts):
        return torch.tensor([self.ce[t] for t in texts])


def test_ambiguity_accuracy_hand_made(tmp_path):
    d = tmp_path / "CoMMuTE/CoMMuTE/en-fr"
    d.mkdir(parents=True)
    cols = {
        "img.order": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        "src.en": ["bat"] * 4,
        "correct.fr": ["c1", "c2", "c3", "c4"],
        "incorrect.fr": ["i1", "i2", "i3", "i4"],
    }
    for name, lines in cols.items():
        (d / name).write_text("\n".join(lines) + "\n")
    ce = {"c1": 1.0, "i1": 2.0, "c2": 3.0, "i2": 0.5, "c3": 0.1, "i3": 0.2, "c4": 2.0, "i4": 2.0}
    opts = DownstreamOptions(
        tmp_path, tmp_path / "out", "commute_lexical_ambiguity_fr", batch_size=3
    )
    out = run_downstream(_StubScorer(ce), opts, {"ckpt": "stub"})
    assert out["results"][0]["accuracy"] == pytest.approx(50.0)  # 1 and 3 right; tie is wrong
    cache = json.loads((tmp_path / "out/preds_ambiguity_commute_fr.json").read_text())
    assert cache["ce_correct"] == pytest.approx([1.0, 3.0, 0.1, 2.0]) and cache["complete"]
