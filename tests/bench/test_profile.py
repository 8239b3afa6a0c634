"""mmcap.bench.profile on the CPU: what it counts is what the step did."""

import gzip
import json

import pytest
import torch

from mmcap.bench.profile import profile_step, profile_table


def test_counts_syncs_and_ranks_operators(tmp_path):
    x = torch.randn(256, 256)

    def step():
        y = x
        for _ in range(3):
            y = torch.tanh(y @ x)
            y.sum().item()  # a host read: three of them

    p = profile_step(step, top=5, trace=tmp_path / "t.json.gz")
    assert p["host_syncs"] == {"aten::_local_scalar_dense": 3}
    assert p["device_busy_s"] is None and p["kernel_launches"] is None  # CPU: no device times
    assert p["wall_s"] > 0 and p["aten_self_host_s"] > 0 and len(p["top_host"]) == 5
    names = {o["name"]: o for o in p["top_host"]}
    assert names["aten::mm"]["count"] == 3  # the matmuls are the costliest host ops here
    assert p["top_host"][0]["self_host_ms"] >= p["top_host"][-1]["self_host_ms"]
    with gzip.open(tmp_path / "t.json.gz") as f:
        assert any(e.get("name") == "aten::mm" for e in json.load(f)["traceEvents"])
    assert not list(tmp_path.glob("*.tmp*"))
    text = profile_table(p)
    assert "aten::_local_scalar_dense x3" in text and "aten::mm" in text


def test_device_summary_counts_each_kernel_once():
    """The CUDA branch (run here on stand-in events): busy time from the device events only,
    though the operator that launched a kernel carries its time too."""
    from types import SimpleNamespace as E

    from mmcap.bench.profile import summarize

    cpu, dev = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [
        E(key="aten::mm", count=4, self_cpu_time_total=400.0, self_device_time_total=8000.0,
          device_type=cpu),
        E(key="sm90_gemm_bf16", count=4, self_cpu_time_total=0.0, self_device_time_total=8000.0,
          device_type=dev),
        E(key="aten::add", count=10, self_cpu_time_total=900.0, self_device_time_total=500.0,
          device_type=cpu),
        E(key="elementwise_kernel", count=10, self_cpu_time_total=0.0,
          self_device_time_total=500.0, device_type=dev),
        E(key="cudaLaunchKernel", count=14, self_cpu_time_total=300.0, self_device_time_total=0.0,
          device_type=cpu),
        E(key="cudaStreamSynchronize", count=2, self_cpu_time_total=50.0,
          self_device_time_total=0.0, device_type=cpu),
    ]  # fmt: skip
    p = summarize(events, wall=0.017, cuda=True)
    assert p["device_busy_s"] == pytest.approx(0.0085)  # 8.0 + 0.5 ms, not twice that
    assert p["device_busy_fraction"] == pytest.approx(0.5)
    assert p["kernel_launches"] == 14 and p["host_syncs"] == {"cudaStreamSynchronize": 2}
    assert p["aten_ops"] == 14 and p["aten_self_host_s"] == pytest.approx(1.3e-3)
    assert [k["name"] for k in p["top_device"]] == ["sm90_gemm_bf16", "elementwise_kernel"]
    assert [o["name"] for o in p["top_ops_device"]] == ["aten::mm", "aten::add"]
    assert [o["name"] for o in p["top_host"]] == ["aten::add", "aten::mm"]
    text = profile_table(p)
    assert "GPU busy 8.5 ms (50%)" in text and "14 kernel launches" in text


def test_a_failing_profiler_keeps_the_benchmark(single_rank_parallel_state, monkeypatch):
    """The benchmark's extra profiled step: a profiler error is reported, not raised (the
    timed results of the run stay)."""
    from mmcap.bench import profile as prof_mod
    from mmcap.bench import train_bench

    def broken(step, **kw):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(prof_mod, "profile_step", broken)
    r = train_bench.run_mmcap_benchmark(
        train_bench.BenchConfig(preset="debug-gemma", steps=1, warmup=0, profile=True,
                                prompt_tokens=4, target_tokens=4)  # fmt: skip
    )
    assert r["step_time_s"] > 0
    (p,) = r["profile_per_rank"]
    assert "CUPTI_ERROR_NOT_INITIALIZED" in p["error"]
    assert profile_table(p).startswith("profile failed: RuntimeError")
