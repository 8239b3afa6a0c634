"""MetricsLogger: JSONL round trip, TensorBoard event files, console line, disabled logger,
missing optional packages."""

import builtins
import json
import logging
import math
import os
import sys

import pytest
import torch

import mmcap.train.logger as logger_mod
from mmcap.train.logger import MetricsLogger, format_duration, memory_stats, read_metrics


def test_jsonl_round_trip_bit_exact(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    values = [0.1 + 0.2, 1 / 3, 2.0**-1074, 1.7976931348623157e308, -0.0, 3.2143e-7]
    with MetricsLogger(metrics_file=str(path)) as log:
        for i, v in enumerate(values):
            log.log(
                i, {"loss": v, "tokens": 1234, "lr": torch.tensor(9.91e-5, dtype=torch.float64)}
            )
    with MetricsLogger(metrics_file=str(path)) as log:  # append mode: a resumed run continues
        log.log(len(values), {"loss": 1.5})
    records = read_metrics(str(path))
    assert [r["step"] for r in records] == list(range(len(values) + 1))
    for r, v in zip(records, values):
        assert r["loss"].hex() == v.hex()  # bit-exact, sign of -0.0 included
        assert r["tokens"] == 1234 and isinstance(r["tokens"], int)
        assert r["lr"] == 9.91e-5
    assert records[-1] == {"step": len(values), "loss": 1.5}


def test_non_finite_values_are_valid_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(metrics_file=str(path)) as log:
        log.log(1, {"loss": math.nan, "grad_norm": math.inf, "x": -math.inf, "ok": 2.5})
    line = path.read_text().strip()
    raw = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert raw == {"step": 1, "loss": "nan", "grad_norm": "inf", "x": "-inf", "ok": 2.5}
    (rec,) = read_metrics(str(path))
    assert math.isnan(rec["loss"]) and rec["grad_norm"] == math.inf and rec["x"] == -math.inf


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    with MetricsLogger(tensorboard_dir=str(tb)) as log:
        log.log(10, {"loss/caption-en": 3.25, "throughput/tflops_per_gpu": 45.5, "note": "x"})
        log.log(20, {"loss/caption-en": 2.5, "throughput/tflops_per_gpu": math.nan})
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss/caption-en", "throughput/tflops_per_gpu"}
    assert [(e.step, e.value) for e in acc.Scalars("loss/caption-en")] == [(10, 3.25), (20, 2.5)]
    tflops = acc.Scalars("throughput/tflops_per_gpu")
    assert tflops[0].value == 45.5 and math.isnan(tflops[1].value)


def test_console_line(caplog):
    log = MetricsLogger(total_steps=1000)
    metrics = {
        "loss": 3.21434,
        "lr": 9.9123e-5,
        "grad_norm": 1.23449,
        "tokens_per_s": 1234.4,
        "images_per_s": 12.34,
        "tflops_per_gpu": 45.61,
        "mfu": 0.0461,
        "mem_gib": 12.34,
        "step_time_s": 3.75,
        "loss/caption-en": 9.0,
    }
    with caplog.at_level(logging.INFO, logger="mmcap.train"):
        log.log(120, metrics)
        log.log(121, {"loss": 1.0}, console=False)
    (rec,) = [r for r in caplog.records if r.name == "mmcap.train"]
    assert rec.levelno == logging.INFO
    # eta: 880 steps x 3.75 s = 3300 s
    assert rec.getMessage() == (
        "train step 120/1000 (12.0%) | loss 3.2143 | lr 9.91e-05 | grad_norm 1.234 | 1234 tok/s | "
        "12.3 img/s | 45.6 TFLOP/s/GPU | MFU 4.6% | mem 12.3 GiB | eta 55m00s"
    )
    log.log(122, {"step_time_s": 4.25}, console=False)  # moving average: (3.75 + 4.25) / 2
    assert (
        log.console_line(880, {"loss": math.nan})
        == "train step 880/1000 (88.0%) | loss nan | eta 8m00s"
    )
    assert MetricsLogger().console_line(5, {"lr": 1e-3}) == "train step 5 | lr 1.00e-03"


def test_eval_lines_are_labelled_with_the_metric_names(caplog, tmp_path):
    """Validation on the console: "eval", the step, the data, then every value under the name
    it has in metrics.jsonl / TensorBoard (splits on one line, task-language keys on another)."""
    log = MetricsLogger(total_steps=300, metrics_file=str(tmp_path / "m.jsonl"))
    metrics = {
        "eval/SC": 2.34567,
        "eval/UC": 3.5,
        "eval/ST": 1.25,
        "eval_key/caption-en": 2.0,
        "eval_key/translation-zh": 1.5,
        "eval/samples": 36,
        "eval/time_s": 1.26,
    }
    with caplog.at_level(logging.INFO, logger="mmcap.train"):
        log.log_eval(50, metrics)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmcap.train"]
    head = "eval step 50/300 | data.valid (36 samples, 1.3 s)"
    assert lines == [
        f"{head} | eval/SC 2.3457 | eval/UC 3.5000 | eval/ST 1.2500",
        f"{head} | eval_key/caption-en 2.0000 | eval_key/translation-zh 1.5000",
    ]
    log.close()
    (record,) = read_metrics(tmp_path / "m.jsonl")
    names = {w for line in lines for w in line.split() if w.startswith(("eval/", "eval_key/"))}
    assert names <= set(record) and record["step"] == 50


def test_third_party_notices_are_quiet_in_worker_processes(monkeypatch):
    """DataLoader workers (forkserver children) import megatron-core afresh: they inherit the
    filters through PYTHONWARNINGS, so its TE / Apex notices stay off the console there too."""
    import subprocess

    from mmcap.train.loop import quiet_third_party_warnings

    monkeypatch.setenv("PYTHONWARNINGS", "ignore::ResourceWarning")
    quiet_third_party_warnings()
    quiet_third_party_warnings()  # idempotent
    env = os.environ["PYTHONWARNINGS"].split(",")
    assert env[0] == "ignore::ResourceWarning" and len(env) == len(set(env)) == 4
    code = (
        "import warnings\n"
        "warnings.warn('Apex is not installed. Falling back to Torch optimizers.')\n"
        "warnings.warn('Transformer Engine and Apex are not installed. Falling back')\n"
        "warnings.warn('something else')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "Apex" not in err and "something else" in err, err


def test_format_duration():
    assert format_duration(3720) == "1h02m"
    assert format_duration(725) == "12m05s"
    assert format_duration(45.2) == "45s"
    assert format_duration(100 * 3600) == "100h00m"


def test_disabled_logger_writes_nothing(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would raise if it were imported
    disabled = MetricsLogger(
        enabled=False,
        tensorboard_dir=str(tmp_path / "tb"),
        wandb_project="p",
        metrics_file=str(tmp_path / "m.jsonl"),
        total_steps=10,
    )
    with caplog.at_level(logging.INFO, logger="mmcap.train"), disabled as log:
        log.log(1, {"loss": 1.0})
    assert list(tmp_path.iterdir()) == []
    assert not [r for r in caplog.records if r.name == "mmcap.train"]


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(wandb_project="mmcap", metrics_file=str(tmp_path / "m.jsonl"))
    assert not (tmp_path / "m.jsonl").exists()


def test_wandb_receives_numeric_metrics(monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(project, name, config):
            calls.append(("init", project, name, config))
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    with MetricsLogger(wandb_project="p", wandb_name="n", wandb_config={"a": 1}) as log:
        log.log(3, {"loss": 2.0, "tag": "x"}, console=False)
    assert calls == [("init", "p", "n", {"a": 1}), ("log", {"loss": 2.0}, 3), ("finish",)]


def test_missing_tensorboard_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    monkeypatch.setattr(logger_mod, "_warned_no_tensorboard", False)
    path = tmp_path / "m.jsonl"
    with caplog.at_level(logging.WARNING, logger="mmcap.train"):
        for _ in range(2):
            with MetricsLogger(tensorboard_dir=str(tmp_path / "tb"), metrics_file=str(path)) as log:
                log.log(1, {"loss": 1.0}, console=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0].getMessage().lower()
    assert len(read_metrics(str(path))) == 2 and not (tmp_path / "tb").exists()


def test_memory_stats():
    stats = memory_stats()
    assert stats["mem_gib"] > 0
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert set(stats) == {"mem_gib"}


def test_tensorboard_inspect_reads_the_logs(tmp_path):
    """The pinned environment runs `tensorboard --inspect` (it imports pkg_resources)."""
    import subprocess
    import sys
    from pathlib import Path

    from mmcap.train.logger import MetricsLogger

    with MetricsLogger(tensorboard_dir=str(tmp_path / "tb")) as lg:
        lg.log(1, {"loss": 2.5}, console=False)
    exe = Path(sys.executable).parent / "tensorboard"
    p = subprocess.run(
        [str(exe), "--inspect", "--logdir", str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loss" in p.stdout + p.stderr
