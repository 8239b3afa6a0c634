"""Training-state checkpoints: N steps, save, load (same or another TP/PP/DP layout), N more
steps == 2N uninterrupted steps; a save that dies before completion leaves `latest` on the
previous checkpoint."""

import os

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")


def _setup(tp, pp):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import full_state_dict, load_full_state_dict
    from mmcap.train.step import build_optimizer, wrap_model
    from tests.train.test_step_layouts import _cfg

    cfg = _cfg("debug-gemma")
    initialize_model_parallel(ParallelConfig(), seed=1)
    torch.manual_seed(0)
    full = full_state_dict(build_model(cfg, precision=FP32))
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize_model_parallel(parallel, seed=1)
    model = build_model(cfg, parallel, FP32)
    load_full_state_dict(
        model, {n: full[model.global_name(n)] for n, _ in model.named_parameters()}
    )
    chunks = wrap_model([model])
    opt = build_optimizer(
        chunks,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            min_lr=1e-5,
            weight_decay=0.01,
            clip_grad=1.0,
            use_distributed_optimizer=True,
        ),
    )
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=1e-5,
        lr_warmup_steps=2,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    return cfg, chunks, opt, sched


def _steps(cfg, chunks, opt, sched, start, n):
    from megatron.core import parallel_state as ps

    from mmcap.train.step import train_step
    from tests.train.test_step_layouts import GLOBAL_BATCH, _batch

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = GLOBAL_BATCH // dp
    losses = []
    for step in range(start, start + n):
        torch.manual_seed(100 + step)  # a different batch per step, same on every layout
        mbs = _batch(cfg)[rank * per : (rank + 1) * per]
        out = train_step(chunks, opt, mbs, encoder_hidden=cfg.encoder.hidden_size, scheduler=sched)
        assert out.update_successful
        losses.append(out.loss)
    return losses


def _run(tp, pp, save_dir, n, save_at=None, resume_from=None, resume_layout=None):
    from mmcap.train.checkpoint import load_train_state, save_train_state

    cfg, chunks, opt, sched = _setup(tp, pp)
    start = 0
    if resume_from:
        state = load_train_state(resume_from, chunks, opt, sched)
        start = state["step"]
        assert state["sampler"] == {"consumed": start * 4}
    losses = _steps(cfg, chunks, opt, sched, start, n)
    if save_at is not None:
        save_train_state(
            save_dir, start + n, chunks, opt, sched, cfg, {"sampler": {"consumed": (start + n) * 4}}
        )
    return losses


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


def _last_stage_losses(results):
    return [r for r in results if r and r[0] == r[0]][0]


def test_resume_same_and_other_layout(workers, tmp_path):
    from mmcap.train.checkpoint import latest_checkpoint

    full = _last_stage_losses(workers.run(_run, 2, 2, str(tmp_path / "a"), 4))
    first = _last_stage_losses(workers.run(_run, 2, 2, str(tmp_path / "s"), 2, save_at=2))
    ckpt = latest_checkpoint(tmp_path / "s")
    assert ckpt is not None and ckpt.name == "step_00000002"
    same = _last_stage_losses(workers.run(_run, 2, 2, None, 2, resume_from=str(ckpt)))
    assert first + same == full  # bit-identical trajectory
    # Another layout (TP=1 PP=2 DP=2): optimizer state reshards; tolerance for reduction order.
    other = _last_stage_losses(workers.run(_run, 1, 2, None, 2, resume_from=str(ckpt)))
    assert all(abs(a - b) <= 1e-5 for a, b in zip(other, full[2:]))


def _die_mid_save(save_dir):
    """Start a save and die (os._exit) after the tensors are written, before completion."""
    import megatron.core.dist_checkpointing as dc

    from mmcap.train.checkpoint import save_train_state

    cfg, chunks, opt, sched = _setup(2, 2)
    # One step first: a never-stepped distributed optimizer has no state to save (megatron-core
    # asserts), which would fail the save before any tensor is written.
    _steps(cfg, chunks, opt, sched, 0, 1)
    real_save = dc.save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        os._exit(1)

    dc.save = save_then_die
    save_train_state(save_dir, 4, chunks, opt, sched, cfg, {"sampler": {"consumed": 16}})


def test_killed_save_keeps_previous_latest(tmp_path):
    from mmcap.train.checkpoint import latest_checkpoint

    with DistributedWorkers(4, timeout=300) as w:
        w.run(_run, 2, 2, str(tmp_path), 1, save_at=1)
    good = latest_checkpoint(tmp_path)
    with DistributedWorkers(4, timeout=60) as w, pytest.raises((TimeoutError, AssertionError)):
        w.run(_die_mid_save, str(tmp_path))
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / "step_00000004.partial").exists()  # the torn save is not "latest"
    with DistributedWorkers(4, timeout=300) as w:
        w.run(_run, 2, 2, None, 1, resume_from=str(good))
