"""Faults a long run meets, each with real files, real signals or real limits: damaged or missing
checkpoints and pointers, a full disk in the middle of a save, NaN gradients with a finite loss,
checkpoints that do not fit the model, ranks whose launcher is killed, Ctrl-C.

In-process runs (:func:`mmcap.testing.train.train_in_process`) on a pooled world of one, real
processes where the behaviour is about processes."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from mmcap.testing import DistributedWorkers
from mmcap.testing.train import train_in_process
from tests.train.test_loop import _args, _env, _latest, _losses, _torchrun

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmcap.data.testing import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "train", 48, seed=3, prompt_vocab=1000, target_vocab=1000
    )


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


def _train(world1, args):
    return world1.run(train_in_process, [str(a) for a in args])[0]


@pytest.fixture(scope="module")
def run6(dataset, tmp_path_factory, world1):
    """A finished 6-step run with checkpoints at 2, 4, 6 (copied by each test that damages it)."""
    save = tmp_path_factory.mktemp("run6") / "run"
    rc, out = _train(world1, _args(dataset, save, 6, "checkpoint.save_interval=2"))
    assert rc == 0, out
    return save


def _copy(run, dst):
    import shutil

    shutil.copytree(run, dst)
    return dst


def _continue(world1, dataset, save, steps=8, *extra):
    """More steps of a run (a longer schedule: optim.override_scheduler)."""
    args = _args(dataset, save, steps, "checkpoint.save_interval=0", *extra)
    return _train(world1, [*args, "optim.override_scheduler=true"])


@pytest.mark.parametrize("pointer", ["missing", "empty", "directory"])
def test_unusable_latest_resumes_newest_complete_step(world1, dataset, run6, tmp_path, pointer):
    run = _copy(run6, tmp_path / "run")
    (run / "latest").unlink()
    if pointer == "empty":
        (run / "latest").write_text("")
    elif pointer == "directory":
        (run / "latest").mkdir()
    rc, out = _continue(world1, dataset, run)
    assert rc == 0, out
    assert "resuming from the newest complete checkpoint" in out and "step_00000006" in out, out
    assert "resumed from" in out and sorted(_losses(run))[-2:] == [7, 8]
    assert (run / "step_00000002").is_dir()  # nothing of the run was deleted


@pytest.mark.parametrize("damage", ["truncated_shard", "broken_state", "flipped_bytes"])
def test_damaged_newest_checkpoint_falls_back(world1, dataset, run6, tmp_path, damage):
    run = _copy(run6, tmp_path / "run")
    newest = run / "step_00000006"
    shard = sorted(newest.glob("*.distcp"))[0]
    if damage == "truncated_shard":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "broken_state":
        (newest / "train_state.json").write_text('{"step": 6, "sampl')
    else:  # 64 bytes flipped in the middle, size unchanged
        data = bytearray(shard.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        shard.write_bytes(bytes(data))
    rc, out = _continue(world1, dataset, run)
    assert rc == 0, out
    assert "skipping damaged checkpoint" in out and "step_00000004" in out, out
    assert "at step 4" in out  # resumed from the previous complete checkpoint
    # Named explicitly, the damaged checkpoint is an error naming the file (exit 4).
    rc, out = _continue(world1, dataset, tmp_path / "other", 8, f"checkpoint.resume={newest}")
    assert rc == 4, out
    assert str(newest) in out


def test_no_usable_checkpoint_refuses_to_start_over(world1, dataset, run6, tmp_path):
    run = _copy(run6, tmp_path / "run")
    for step in run.glob("step_*"):
        (step / "train_state.json").write_text("{")
    before = sorted(p.name for p in run.iterdir())
    rc, out = _continue(world1, dataset, run)
    assert rc == 4 and "Refusing to start over them" in out, out
    assert sorted(p.name for p in run.iterdir()) == before


def test_resume_none_refuses_an_existing_run_unless_overwrite(world1, dataset, run6, tmp_path):
    run = _copy(run6, tmp_path / "run")
    rc, out = _continue(world1, dataset, run, 2, "checkpoint.resume=none")
    assert rc == 2 and "already holds a run's checkpoints" in out, out
    assert _latest(run) == "step_00000006"
    rc, out = _continue(
        world1, dataset, run, 2, "checkpoint.resume=none", "checkpoint.overwrite=true"
    )
    assert rc == 0, out
    assert sorted(_losses(run)) == [1, 2] and _latest(run) == "step_00000002"
    assert not (run / "step_00000006").exists()


def _fill_disk_then_train(args, limit):
    """In the worker: a file-size limit (as a full disk) for the run, then lifted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return train_in_process(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_during_save_fails_cleanly(world1, dataset, run6, tmp_path):
    run = _copy(run6, tmp_path / "run")
    args = [
        str(a)
        for a in _args(dataset, run, 8, "checkpoint.save_interval=0", "optim.override_scheduler=true")
    ]
    # the step-8 save writes shards larger than 1 MB: the write fails with EFBIG
    rc, out = world1.run(_fill_disk_then_train, args, 1 << 20)[0]
    assert rc == 4, out
    assert "file-size limit is full" in out, out
    assert not list(run.glob("*.partial")) and _latest(run) == "step_00000006"
    rc, out = _continue(world1, dataset, run)  # and the run resumes from step 6
    assert rc == 0 and "at step 6" in out, out


def test_failure_after_training_started_exits_promptly(dataset, run6, tmp_path):
    """A real `python -m mmcap.train` with a DataLoader worker (which ignores SIGTERM / SIGINT)
    whose save fails (file-size limit): it must exit non-zero at once, not hang at exit joining
    the worker, and leave no process behind."""
    run = _copy(run6, tmp_path / "run")
    args = _args(dataset, run, 8, "checkpoint.save_interval=0", "optim.override_scheduler=true")

    def limit():  # in the child only
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    t0 = time.time()
    p = subprocess.Popen(
        [sys.executable, "-m", "mmcap.train", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=limit,
    )
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 4, out[-3000:]
    assert "file-size limit is full" in out and "Traceback" not in out, out[-3000:]
    assert time.time() - t0 < 200
    leftover = [x for x in psutil.process_iter(["cmdline"]) if str(run) in " ".join(x.info["cmdline"] or [])]
    assert not leftover


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def _train_with_nan_gradient_at(args, call):
    """In the worker: the loss of the ``call``-th training micro-batch back-propagates NaN
    (its value stays finite)."""
    import mmcap.train.step as step

    real, seen = step.key_loss, {"n": 0}

    def poisoned(mb, output):
        seen["n"] += 1
        if seen["n"] == call:
            output = _NanGradient.apply(output)
        return real(mb, output)

    step.key_loss = poisoned
    try:
        return train_in_process(args)
    finally:
        step.key_loss = real


def test_nan_gradient_in_fp32_is_skipped_not_saved(world1, dataset, tmp_path):
    save = tmp_path / "run"
    # 4 micro-batches per step: call 13 is in step 4, which is also a save step
    args = [str(a) for a in _args(dataset, save, 6, "checkpoint.save_interval=2")]
    rc, out = world1.run(_train_with_nan_gradient_at, args, 13)[0]
    assert rc == 0, out
    assert "step 4 skipped: non-finite gradients" in out, out
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 0, 1, 1, 1]
    assert all(isinstance(r["loss"], float) for r in recs[4:])  # later steps train on
    # the interval checkpoint of the bad step was not written (policy), the end one was, and
    # every saved weight is finite
    assert not (save / "step_00000004").exists() and _latest(save) == "step_00000006"
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(save / "step_00000006"))
    assert meta  # sanity: a readable checkpoint (its finiteness is checked at save time)


def test_checkpoint_that_does_not_fit_is_refused(world1, dataset, run6, tmp_path):
    run = _copy(run6, tmp_path / "run")
    rc, out = _continue(world1, dataset, run, 8, "model.decoder.num_layers=2")
    assert rc == 4, out
    assert "does not fit the model" in out and "model.decoder.num_layers 4 vs 2" in out, out
    args = _args(dataset, run, 8, "checkpoint.save_interval=0", "optim.override_scheduler=true")
    args[args.index("--preset") + 1] = "debug-florence"
    rc, out = _train(world1, args)
    assert rc == 4 and "does not fit the model" in out, out
    assert len(out) < 20_000  # not a dump of every key


def test_resume_with_another_schedule_is_refused_or_applied(world1, dataset, run6, tmp_path):
    """Resuming with train_steps / optim.lr changed: refused naming the keys (exit 2, nothing
    recorded), or applied with optim.override_scheduler=true (and recorded)."""
    run = _copy(run6, tmp_path / "run")
    recorded = (run / "train_config.json").read_text()
    args = _args(dataset, run, 9, "checkpoint.save_interval=0", "optim.lr=5e-3")
    rc, out = _train(world1, args)
    assert rc == 2, out
    assert "optim.lr" in out and "train_steps" in out and "override_scheduler" in out, out
    assert (run / "train_config.json").read_text() == recorded  # nothing not in force
    rc, out = _train(world1, [*args, "optim.override_scheduler=true"])
    assert rc == 0, out
    assert json.loads((run / "train_config.json").read_text())["optim"]["lr"] == 5e-3
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lr7 = [r["lr"] for r in recs if r["step"] == 7][-1]
    assert lr7 > 1e-3  # the new peak (5e-3, cosine over 9 steps), not the old schedule's


def _children(pid):
    return psutil.Process(pid).children(recursive=True)


def test_ranks_die_with_their_launcher(dataset, tmp_path):
    """kill -KILL of torchrun's process group: the ranks (each in a session of its own) and
    their DataLoader workers must not outlive it."""
    save = tmp_path / "run"
    cmd = _torchrun(2, _args(dataset, save, 10_000, "checkpoint.save_interval=0"))
    with open(tmp_path / "run.log", "w") as log:
        p = subprocess.Popen(
            cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            m = save / "metrics.jsonl"
            if m.is_file() and m.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        assert p.poll() is None, (tmp_path / "run.log").read_text()
        procs = _children(p.pid)
        assert len(procs) >= 2
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    gone, alive = psutil.wait_procs(procs, timeout=20)
    assert not alive, [(x.pid, x.cmdline()[-3:]) for x in alive]


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_checkpoints_and_nothing_outlives_the_run(dataset, tmp_path, launcher):
    """SIGINT to the process group, as a terminal sends: every rank checkpoints the current step
    and exits 0, and no process (rank, DataLoader worker) is left."""
    save = tmp_path / "run"
    args = _args(dataset, save, 10_000, "checkpoint.save_interval=0")
    cmd = [sys.executable, "-m", "mmcap.train", *args] if launcher == "python" else _torchrun(2, args)
    with open(tmp_path / "run.log", "w") as log:
        p = subprocess.Popen(
            cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            m = save / "metrics.jsonl"
            if m.is_file() and m.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        assert p.poll() is None, (tmp_path / "run.log").read_text()
        procs = _children(p.pid)
        os.killpg(p.pid, signal.SIGINT)
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    out = (tmp_path / "run.log").read_text()
    last = max(_losses(save))
    assert _latest(save) == f"step_{last:08d}", out
    if launcher == "python":
        assert rc == 0, out
    gone, alive = psutil.wait_procs(procs, timeout=20)
    assert not alive, [(x.pid, x.cmdline()[-3:]) for x in alive]


def test_checkpointer_never_saves_non_finite_weights(tmp_path):
    """The guard in front of every save (world of one, no process group needed)."""
    from mmcap.config import get_preset
    from mmcap.train.checkpoint import weights_are_finite
    from mmcap.train.checkpointer import Checkpointer
    from mmcap.train.config import CheckpointConfig
    from mmcap.train.state import TrainState

    layer = torch.nn.Linear(3, 3)
    assert weights_are_finite([layer])
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert not weights_are_finite([layer])
    ckpt = Checkpointer(
        CheckpointConfig(save=str(tmp_path / "run"), save_interval=1),
        get_preset("debug-gemma"),
        [layer],
        optimizer=None,
        scheduler=None,
    )
    assert ckpt.maybe_save(TrainState(step=1), "end") is False
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("step_*"))
