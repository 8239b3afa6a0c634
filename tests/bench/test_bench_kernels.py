"""tools/bench_kernels.py on the CPU (--tiny: the reference paths on tiny shapes; the numbers
mean nothing here): every kernel and implementation gets a row, the JSON is written after every
row (a GPU run cut short by its time limit keeps what it measured), and a missing optional
baseline (Liger, CCE) is named rather than silently dropped."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import bench_kernels  # noqa: E402


def test_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "k.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools/bench_kernels.py"), "--tiny", "--iters", "1",
         "--warmup", "0", "--no-compile", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is True and data["meta"]["device"] == "cpu"
    impls = {(r["kind"], r["impl"]) for r in data["results"]}
    assert {("softcap_ce", "mmcap_fused"), ("softcap_ce", "mmcap_recompute"),
            ("softcap_ce", "torch_unfused"), ("rmsnorm", "mmcap"), ("rmsnorm", "torch_eager"),
            ("geglu", "mmcap"), ("geglu", "torch_eager")} <= impls  # fmt: skip
    assert all(r["ms"] is not None and r["ms"] > 0 for r in data["results"]), data["results"]
    assert "torch_compile" not in {i for _, i in impls}  # --no-compile
    for pkg, row in (("liger_kernel", "liger_flce"), ("cut_cross_entropy", "cut_ce")):
        try:
            __import__(pkg)
        except ImportError:
            assert row not in {i for _, i in impls} and pkg.replace("_", "-") in res.stderr


def test_rows_are_saved_as_they_come_and_failures_recorded(monkeypatch):
    saved = []

    def boom(h, w, y, cap):
        raise RuntimeError("planted")

    real = bench_kernels.ce_candidates
    monkeypatch.setattr(bench_kernels, "ce_candidates", lambda c: {**real(c), "broken": boom})
    args = type("A", (), {"iters": 1, "warmup": 0, "compile": False})()
    rows = bench_kernels.run(args, on_row=lambda rs: saved.append(len(rs)))
    assert saved == list(range(1, len(rows) + 1))
    broken = [r for r in rows if r["impl"] == "broken"]
    assert broken and all(r["ms"] is None and "planted" in r["error"] for r in broken)
