"""What CPU can check of the one-call GPU check: the script parses (bash -n), its dry run lists
every stage with the issue's benchmark settings, bad arguments fail with a message, and the
results collector merges the JSON files into <date>-<device>.json."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_stage(tmp_path):
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith("[dry-run]")]
    stages = [line.split("(")[1].split(",")[0] for line in lines]
    assert [s for s in stages if s not in ("wheels", "csrc")] == [
        "imports",
        "gpu-tests",
        "kernels-bench",
        "optimizer-bench",
        "train-large",
        "attention-2b",
        "decode",
        "collect",
    ]
    # the 11.2B stages only on request (their build alone took > 110 s on an H200)
    env = dict(os.environ, MMCAP_GPU_CHECK_XLARGE="1")
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, env=env
    )
    assert "(train-xlarge," in res.stdout and "(attention-9b," in res.stdout
    env = dict(os.environ, MMCAP_GPU_CHECK_COMPILE="1")
    res_c = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, env=env
    )
    compiled = next(line for line in res_c.stdout.splitlines() if "(train-large-compiled," in line)
    assert "--compile" in compiled and "florence-gemma-2-large" in compiled
    env = dict(os.environ, MMCAP_GPU_CHECK_BASE="0", MMCAP_GPU_CHECK_COMPILE="1")
    res_b = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, env=env
    )
    second = [ln.split("(")[1].split(",")[0] for ln in res_b.stdout.splitlines()
              if ln.startswith("[dry-run]")]  # fmt: skip
    assert [s for s in second if s not in ("wheels", "csrc")] == [
        "imports", "train-large-compiled", "kernels-bench-compiled", "collect"]  # fmt: skip
    assert "train-large skipped (MMCAP_GPU_CHECK_BASE=0)" in res_b.stdout
    kernels = next(line for line in res_c.stdout.splitlines() if "(kernels-bench-compiled," in line)
    assert "--no-compile" not in kernels and "kernels_compiled.json" in kernels
    env = dict(os.environ, MMCAP_GPU_CHECK_TRACE="1")
    res_t = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, env=env
    )
    traced = next(line for line in res_t.stdout.splitlines() if "(train-large," in line)
    assert "--profile-trace gpu_check_out/train_large_trace.json.gz" in traced
    gpu = next(line for line in lines if "(gpu-tests," in line)
    assert "-m gpu" in gpu and "tests/ops/test_attention.py" in gpu  # files with the marker
    assert "tests/bench/" not in gpu
    large = next(line for line in lines if "(train-large," in line)
    for flag in (
        "--preset florence-gemma-2-large",
        "--image-size 224",
        "--prompt-tokens 128",
        "--target-tokens 128",
        "--precision bf16",
        "--compare hf",
        "--profile",
        "train_large.json",
    ):
        assert flag in large, flag
    optim = next(line for line in lines if "(optimizer-bench," in line)
    assert "tools/bench_optimizer.py --preset florence-gemma-2-large" in optim
    assert "optimizer.json" in optim
    xlarge = next(line for line in res.stdout.splitlines() if "(train-xlarge," in line)
    assert "florence-gemma-2-xlarge" in xlarge
    # The stage limits, the csrc/ build's included, fit one call of the device tool (10 min).
    limits = [int(line.split(", ")[1].split("s)")[0]) for line in lines]
    assert any("(csrc," in line for line in lines)
    assert sum(limits) <= 10 * 60, limits
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_unknown_argument_fails():
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr


def test_collect_merges_and_names_the_file(tmp_path):
    from mmcap.bench.collect import collect, results_name

    (tmp_path / "train_large.json").write_text(json.dumps({"results": [1]}))
    (tmp_path / "attention_2b.json").write_text(json.dumps({"attention": []}))
    path = collect(tmp_path)
    merged = json.loads(path.read_text())
    assert set(merged["parts"]) == {"train_large", "attention_2b"}
    assert path.name == results_name(merged["environment"])
    assert results_name({"date_utc": "2026-11-29T22:00:00+00:00", "device": "NVIDIA H200"}) == (
        "2026-11-29-nvidia-h200.json"
    )
    assert collect(tmp_path) == path  # a second run does not swallow its own output
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        collect(tmp_path, prune=True)
    assert (tmp_path / "train_large.json").exists()  # a failed merge removes nothing
    (tmp_path / "bad.json").unlink()
    path = collect(tmp_path, prune=True)  # the device tool returns at most 8 files
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert set(json.loads(path.read_text())["parts"]) == {"train_large", "attention_2b"}


def test_imports_stage(monkeypatch, capsys):
    from mmcap.bench import imports

    assert imports.main() == 0  # this venv has every required module
    out = capsys.readouterr().out
    assert "megatron.core" in out and "transformers" in out and "liger_kernel" in out
    monkeypatch.setattr(imports, "REQUIRED", ["torch", "no_such_module_mmcap"])
    assert imports.main() == 1
    captured = capsys.readouterr()
    assert "no_such_module_mmcap" in captured.out and "MISSING" in captured.out
    assert "required modules failed: no_such_module_mmcap" in captured.err
