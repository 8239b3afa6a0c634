"""mmcap.bench.profile on the CPU: what it counts is what the step did."""

import gzip
import json

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
