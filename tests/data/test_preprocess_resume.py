"""Preprocessing runs: atomic output, resume after a kill, restart on changed inputs, workers."""

import importlib.util
import json
from pathlib import Path

import pytest

import mmcap.data.preprocess as pp
from mmcap.data.config import PreprocessConfig
from mmcap.data.indexed import STORES, CaptionDataset
from tests.data.test_preprocess import _official_shards

REPO = Path(__file__).resolve().parents[2]
_RUN = pp._ShardJob.run


def _store_bytes(path: Path) -> dict:
    """Every data file of a dataset (manifest compared separately)."""
    names = [f"{s}.{ext}" for s in STORES for ext in ("bin", "idx")]
    names += ["entries.npy", "group_offsets.npy", "rejects.jsonl"]
    return {n: (path / n).read_bytes() for n in names}


def _manifest_body(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    m.pop("created")
    for s in m["sources"]:
        s["path"] = Path(s["path"]).name
    return m


class _Spy:
    """Wraps _ShardJob.run: records shard indices; optionally fails on one of them."""

    def __init__(self, monkeypatch, fail_on=None):
        self.ran = []

        def run(job):
            self.ran.append(job.index)
            if job.index == fail_on:
                raise RuntimeError("killed")
            return _RUN(job)

        monkeypatch.setattr(pp._ShardJob, "run", run)


@pytest.fixture()
def shards(tmp_path):
    (tmp_path / "in").mkdir()
    _official_shards(tmp_path / "in", n_shards=3, per_shard=3)
    return [str(tmp_path / "in/shard-*.tar")]


def test_killed_run_resumes_and_equals_clean_run(tmp_path, shards, tiny_tokenizers, monkeypatch):
    gemma, bart = tiny_tokenizers
    out = tmp_path / "out"
    spy = _Spy(monkeypatch, fail_on=1)
    with pytest.raises(RuntimeError, match="killed"):
        pp.preprocess(shards, gemma, bart, str(out), show_progress=False)
    assert spy.ran == [0, 1]
    assert not out.exists()  # nothing reads as a dataset
    with pytest.raises(FileNotFoundError):
        CaptionDataset(out)
    partial = tmp_path / "out.partial"
    assert (partial / "shards/000000/stats.json").exists()
    (partial / "shards/000001.tmp").mkdir()  # a shard killed half-way
    (partial / "shards/000001.tmp/prompts.bin").write_bytes(b"junk")

    spy = _Spy(monkeypatch)
    pp.preprocess(shards, gemma, bart, str(out), show_progress=False)
    assert spy.ran == [1, 2]  # shard 0 was reused
    assert not partial.exists()

    pp.preprocess(shards, gemma, bart, str(tmp_path / "clean"), show_progress=False)
    assert _store_bytes(out) == _store_bytes(tmp_path / "clean")
    assert _manifest_body(out) == _manifest_body(tmp_path / "clean")


def test_kill_during_merge_and_changed_plan(tmp_path, shards, tiny_tokenizers, monkeypatch):
    gemma, bart = tiny_tokenizers
    out = tmp_path / "out"

    def boom(**kw):
        raise RuntimeError("killed in merge")

    with monkeypatch.context() as m:
        m.setattr(pp, "build_manifest", boom)
        with pytest.raises(RuntimeError, match="merge"):
            pp.preprocess(shards, gemma, bart, str(out), show_progress=False)
    assert not out.exists()
    # Different limits: the partial work no longer applies and is discarded.
    spy = _Spy(monkeypatch)
    cfg = PreprocessConfig(max_target_tokens=500)
    pp.preprocess(shards, gemma, bart, str(out), cfg, show_progress=False)
    assert spy.ran == [0, 1, 2]
    assert CaptionDataset(out).manifest["config"]["max_target_tokens"] == 500
    with pytest.raises(FileExistsError, match="overwrite"):
        pp.preprocess(shards, gemma, bart, str(out), show_progress=False)
    manifest = pp.preprocess(shards, gemma, bart, str(out), overwrite=True, show_progress=False)
    assert manifest["config"]["max_target_tokens"] == 1024
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not an mmcap dataset"):
        pp.preprocess(shards, gemma, bart, str(tmp_path / "other"), show_progress=False)


def test_workers_match_serial_via_cli(tmp_path, shards, tiny_tokenizers, capsys):
    """tools/preprocess_data.py with --workers 2 (forkserver pool) == in-process run."""
    gemma, bart = tiny_tokenizers
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", REPO / "tools/preprocess_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--input", *shards, "--gemma-tokenizer", gemma, "--encoder-tokenizer", bart, "--quiet"]
    assert tool.main(argv + ["--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["images"] == 9
    assert tool.main(argv + ["--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert _store_bytes(tmp_path / "w2") == _store_bytes(tmp_path / "w1")
    assert _manifest_body(tmp_path / "w2") == _manifest_body(tmp_path / "w1")
