"""Compute report (the paper's S and C): S = steps x batch size, MACs of one 224 px, 128 / 128
token forward measured by torch's FlopCounterMode on the real model, parameters counted on the
built model, factor and C by the official formula; steps and batch size read from a training
checkpoint's files."""

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmcap.config import PrecisionConfig, get_preset
from mmcap.eval.compute import (
    TrainingRun,
    compute_report,
    resolve_training_run,
    training_run_from_checkpoint,
)


@pytest.fixture(autouse=True)
def _math_attention(monkeypatch):
    monkeypatch.setenv("MMCAP_ATTN_BACKEND", "math")  # full score matrices, counted as bmm


def _measured_forward_flops(model, cfg) -> float:
    """One whole-model forward at 224 px, 128 prompt and 128 target tokens (the official
    measure_model_complexity inputs), counted by FlopCounterMode (2 per multiply-add)."""
    torch.manual_seed(0)
    prompt = torch.randint(3, 900, (1, 128))
    dec = torch.randint(3, 900, (1, 128))
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as c:
        model(prompt, dec, torch.ones_like(prompt, dtype=torch.bool), pixel_values=pixels)
    return float(c.get_total_flops())


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_report_against_the_real_model(single_rank_parallel_state, preset):
    from mmcap.model.build import build_model

    cfg = get_preset(preset)  # a 64 px model: the report is at 224 px whatever it trained at
    model = build_model(
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=224)),
        precision=PrecisionConfig("fp32"),
    ).eval()
    flops = _measured_forward_flops(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total  # the frozen vision tower
    r = compute_report(cfg, TrainingRun(500, 1024))
    assert r["model_flops"] == flops
    assert r["model_macs"] == flops / 2
    assert (r["model_params"], r["trainable_model_params"]) == (total, trainable)
    assert r["training_seen_samples"] == 512_000
    factor = 1 + trainable / total
    assert r["forward_backward_factor"] == pytest.approx(factor, rel=1e-15)
    assert r["training_macs"] == pytest.approx(512_000 * flops / 2 * factor, rel=1e-15)
    assert r["training_flops"] == pytest.approx(2 * r["training_macs"], rel=1e-15)
    assert (r["image_size"], r["prompt_tokens"], r["target_tokens"]) == (224, 128, 128)
    assert json.loads(json.dumps(r)) == r  # JSON-able as is


def _training_checkpoint(root, step=40, batch=24):
    """The files a training run leaves (mmcap.train.loop / mmcap.train.checkpoint)."""
    ckpt = root / "save" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": step, "consumed_samples": 960}))
    (root / "save" / "train_config.json").write_text(json.dumps({"global_batch_size": batch}))
    return ckpt


def test_training_run_from_checkpoint_files(tmp_path):
    from mmcap.train.checkpoint import STATE_FILE

    ckpt = _training_checkpoint(tmp_path)
    assert STATE_FILE == "train_state.json"
    run = training_run_from_checkpoint(ckpt)
    assert (run.steps, run.batch_size) == (40, 24)
    assert resolve_training_run(ckpt) == run
    assert resolve_training_run(ckpt, 7, 3) == TrainingRun(7, 3)  # the command line wins
    with pytest.raises(ValueError, match="both --training-steps and --training-batch-size"):
        resolve_training_run(ckpt, 7, None)
    (tmp_path / "save" / "train_config.json").write_text("{}")
    with pytest.raises(ValueError, match="train_config.json: field 'global_batch_size'"):
        training_run_from_checkpoint(ckpt)
    (tmp_path / "save" / "train_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_config.json"):
        training_run_from_checkpoint(ckpt)
    assert resolve_training_run(ckpt) is None  # no report, and a warning
    assert resolve_training_run(tmp_path) is None  # a model checkpoint: no report
    with pytest.raises(ValueError, match="TrainingRun.steps"):
        TrainingRun(-1, 3)
