"""What CPU can check of the csrc/ build switches (setup.py's MMCAP_CUDA_OPS / MMCAP_CUDA_ARCHS)
and of tools/build_kernels.py (the GPU check's concurrent build). The build itself needs a CUDA
torch; the compile of every kernel and binding is `make check-kernels`."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

from tools.build_kernels import discover_ops

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "build_kernels.py"
OPS = sorted(p.parent.name for p in (REPO / "csrc").glob("*/*_api.cpp"))


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, without running setup()."""
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("MMCAP_SKIP_CUDA_BUILD", "1")
    return runpy.run_path(str(REPO / "setup.py"))


def _gencodes(flags: list[str]) -> list[str]:
    return [flags[i + 1] for i, f in enumerate(flags) if f == "-gencode"]


def test_setup_arch_switch(setup_py, monkeypatch):
    monkeypatch.delenv("MMCAP_CUDA_ARCHS", raising=False)
    default = setup_py["nvcc_flags"]()
    assert _gencodes(default) == ["arch=compute_90,code=sm_90", "arch=compute_80,code=sm_80"]
    monkeypatch.setenv("MMCAP_CUDA_ARCHS", "90")
    only = setup_py["nvcc_flags"]()
    assert _gencodes(only) == ["arch=compute_90,code=sm_90"]
    # everything else of csrc/nvcc_flags.txt is kept
    assert [f for f in only if "compute_" not in f and f != "-gencode"] == [
        f for f in default if "compute_" not in f and f != "-gencode"
    ]
    monkeypatch.setenv("MMCAP_CUDA_ARCHS", "80, 100")
    assert _gencodes(setup_py["nvcc_flags"]()) == [
        "arch=compute_80,code=sm_80", "arch=compute_100,code=sm_100"
    ]  # fmt: skip
    monkeypatch.setenv("MMCAP_CUDA_ARCHS", "sm_90")
    with pytest.raises(SystemExit, match="MMCAP_CUDA_ARCHS"):
        setup_py["nvcc_flags"]()


def test_setup_ops_switch(setup_py, monkeypatch):
    monkeypatch.delenv("MMCAP_CUDA_OPS", raising=False)
    every = setup_py["op_sources"]()
    assert sorted(every) == OPS and OPS  # csrc/common/ (headers only) is not an op
    assert discover_ops() == OPS  # tools/build_kernels.py starts one build per op of setup.py's
    for op, sources in every.items():
        assert f"csrc/{op}/{op}_api.cpp" in sources and any(s.endswith(".cu") for s in sources)
    monkeypatch.setenv("MMCAP_CUDA_OPS", "rmsnorm")
    assert list(setup_py["op_sources"]()) == ["rmsnorm"]
    monkeypatch.setenv("MMCAP_CUDA_OPS", "rmsnorm,nope")
    with pytest.raises(SystemExit, match=r"\['nope'\]"):
        setup_py["op_sources"]()


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          cwd=REPO, check=False)  # fmt: skip


def test_dry_run_one_process_per_op():
    res = _tool("--dry-run", "--arch", "90")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split("]")[0][1:] for ln in lines] == OPS
    for op, line in zip(OPS, lines, strict=True):
        assert f"MMCAP_CUDA_OPS={op} " in line and "MMCAP_CUDA_ARCHS=90 " in line
        assert f"build_ext --inplace --build-temp build/kernels/{op}" in line
    default = _tool("--dry-run", "--ops", "geglu")
    assert default.returncode == 0 and "MMCAP_CUDA_ARCHS" not in default.stdout
    assert _tool("--ops", "nope").returncode == 2


@pytest.mark.skipif(
    __import__("torch").version.cuda is not None, reason="checks the CPU torch's refusal"
)
def test_never_claims_a_build_that_did_not_happen(tmp_path):
    """With a CPU torch setup.py skips the extensions and exits 0: the tool must still fail."""
    res = _tool("--ops", "geglu")
    assert res.returncode == 1
    assert "built nothing" in res.stdout and "0/1 ops" in res.stdout
