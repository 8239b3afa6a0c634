"""tools/bench_optimizer.py on the CPU (debug-gemma's trainable tensors; the numbers mean
nothing here): every implementation gets a row, the Adam implementations make the same update
and the grad norms agree, the tensor count is the model's."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cpu_run_writes_every_row(tmp_path):
    out = tmp_path / "o.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools/bench_optimizer.py"), "--steps", "1", "--warmup", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "debug-gemma: 49 trainable tensors" in res.stdout
    data = json.loads(out.read_text())["optimizer"]
    assert data["preset"] == "debug-gemma" and data["device"] == "cpu"
    # mmcap.model.size.count_parameters(debug-gemma).trainable: 313,220 in 49 tensors
    assert data["tensors"] == 49 and data["trainable_params"] == 313220
    rows = {(r["kind"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {
        ("adamw", "fused"), ("adamw", "foreach"), ("adamw", "for-loop"),
        ("grad_norm", "megatron_local"), ("grad_norm", "mmcap_foreach"),
        ("clip_scale", "megatron_local"), ("clip_scale", "mmcap_foreach"),
    }  # fmt: skip
    assert all(r["ms"] > 0 for r in data["rows"])
    assert rows[("adamw", "for-loop")]["max_abs_diff_vs_for_loop"] == 0.0
    for impl in ("fused", "foreach"):  # the same update (float32, reordered): parameters ~1
        assert rows[("adamw", impl)]["max_abs_diff_vs_for_loop"] < 1e-6
    local, mine = rows[("grad_norm", "megatron_local")], rows[("grad_norm", "mmcap_foreach")]
    assert abs(local["value"] - mine["value"]) <= 1e-5 * local["value"]


def test_unknown_preset_is_an_error():
    from mmcap.testing.train import tool_in_process

    code, out = tool_in_process("bench_optimizer", ["--preset", "nope"])
    assert code == 2 and "bench_optimizer:" in out and "nope" in out
