"""The whole training loop as users run it.

Two tiers (the runs cost mostly interpreter start-up, so only process semantics pay for it):

- real ``torchrun -m mmcap.train`` processes for what is about processes: kill -9 of the whole
  process group after a checkpoint, then ``--resume auto``: the per-step losses equal (bit for
  bit) those of an uninterrupted run; SIGTERM to the process group: every rank checkpoints the
  current step and exits 0;
- the same command line run IN-PROCESS on a rank of this module's gloo pools
  (:func:`mmcap.testing.train.train_in_process`, a world of 2 for PP=2 and a world of 1 for a
  plain ``python -m mmcap.train``) for everything else: non-finite steps, the save policy,
  fp16 / bf16, resume in another layout, interleaved runs, the tools on training checkpoints.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mmcap.testing import DistributedWorkers
from mmcap.testing.train import tool_in_process, train_in_process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world2():
    with DistributedWorkers(2, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


def _train2(world2, args) -> tuple[int, str]:
    """A 2-rank run in the pool: (exit code of rank 0, both ranks' logs)."""
    res = world2.run(train_in_process, [str(a) for a in args])
    assert res[0][0] == res[1][0], res
    return res[0][0], res[0][1] + res[1][1]


def _train1(world1, args) -> tuple[int, str]:
    return world1.run(train_in_process, [str(a) for a in args])[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmcap.data.testing import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "train",
        48,
        seed=3,
        prompt_vocab=1000,
        target_vocab=1000,
    )


def _args(dataset, save, steps, *extra):
    return [
        "--preset",
        "debug-gemma",
        f"data.train=[{dataset}]",
        "data.batch.max_prompt_tokens=24",
        "data.batch.max_target_tokens=24",
        "data.num_workers=1",
        f"checkpoint.save={save}",
        f"train_steps={steps}",
        "global_batch_size=8",
        "micro_batch_size=2",
        "precision.params_dtype=fp32",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "logging.log_interval=1",
        "logging.tensorboard_dir=",
        *extra,
    ]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    return env


def _torchrun(nproc, args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mmcap.train",
        *args,
    ]


def _start(cmd, log):
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _run(cmd, log_path, timeout=300):
    with open(log_path, "w") as log:
        p = _start(cmd, log)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    return rc, Path(log_path).read_text()


def _losses(save) -> dict[int, float]:
    """Last logged loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (Path(save) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _latest(save) -> str | None:
    p = Path(save) / "latest"
    return p.read_text().strip() if p.is_file() else None


LAYOUT = ["parallel.pipeline_parallel=2"]  # PP=2 on 2 processes


STEPS = 12


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory, world2):
    """STEPS uninterrupted steps at PP=2 (checkpoints every 4 steps), in-process on 2 ranks."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    rc, out = _train2(world2, _args(dataset, ref, STEPS, "checkpoint.save_interval=4", *LAYOUT))
    assert rc == 0, out
    return ref


def test_kill9_resume_is_bit_identical(dataset, reference_run, tmp_path):
    """Real torchrun processes, killed with SIGKILL, resumed: equal (bit for bit) to the
    in-process reference run, which also shows both tiers run the same computation; no
    process of the killed run outlives it."""
    steps = STEPS
    want = _losses(reference_run)
    assert sorted(want) == list(range(1, steps + 1))

    run = tmp_path / "run"
    cmd = _torchrun(2, _args(dataset, run, steps, "checkpoint.save_interval=4", *LAYOUT))
    with open(tmp_path / "killed.log", "w") as log:
        p = _start(cmd, log)
        deadline = time.time() + 240
        while _latest(run) is None and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, (
            "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()
        )
        # Every process of the run: the ranks and, since a save happened, each writing rank's
        # megatron-core checkpoint-writer server (a "spawn" Manager, which outlived a SIGKILLed
        # rank before mmcap.parallel.lifetime.checkpoint_writer_dies_with_parent).
        procs = psutil.Process(p.pid).children(recursive=True)
        servers = [x for x in procs if "spawn_main" in " ".join(x.cmdline())]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert servers, [x.cmdline()[-3:] for x in procs]  # the case this checks happened
    gone, alive = psutil.wait_procs(procs, timeout=20)
    assert not alive, [(x.pid, x.cmdline()[-3:]) for x in alive]
    killed_at = max(_losses(run))
    assert killed_at < steps, "killed too late to test a resume"
    rc, out = _run(cmd + ["--resume", "auto"], tmp_path / "resumed.log")
    assert rc == 0, out
    assert "resumed from" in out
    got = _losses(run)
    assert got == want  # bit-identical floats, every step


def test_sigterm_checkpoints_and_exits_zero(dataset, tmp_path):
    save = tmp_path / "run"
    cmd = _torchrun(2, _args(dataset, save, 10_000, "checkpoint.save_interval=0", *LAYOUT))
    with open(tmp_path / "run.log", "w") as log:
        p = _start(cmd, log)
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            m = save / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert p.poll() is None, (tmp_path / "run.log").read_text()
        os.killpg(p.pid, signal.SIGTERM)  # as Slurm preemption: every process of the job
        p.wait(timeout=120)
    out = (tmp_path / "run.log").read_text()
    last = max(_losses(save))
    assert _latest(save) == f"step_{last:08d}", out
    assert out.count("checkpointing step") >= 1, out
    # both workers exited 0 (torchrun reports failed workers with their exit codes)
    assert "exitcode" not in out or "exitcode  : 0" in out, out
    state = json.loads((save / _latest(save) / "train_state.json").read_text())
    assert state["step"] == last and state["consumed_samples"] == 8 * last


def test_nonfinite_steps_are_skipped_then_stop(dataset, tmp_path, world1):
    """LR 1e30 blows the weights up after step 1: later losses are non-finite, skipped and
    logged; after max_bad_steps in a row the run stops with exit code 3 and writes no new
    checkpoint (world of one)."""
    save = tmp_path / "run"
    args = _args(
        dataset,
        save,
        50,
        "checkpoint.save_interval=1",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.clip_grad=0",
        "max_bad_steps=3",
    )
    rc, out = _train1(world1, args)
    assert rc == 3, out
    assert "steps in a row had a non-finite loss" in out
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r.get("skipped_steps")]
    assert len(skipped) >= 3
    last_good = max(r["step"] for r in recs if not r.get("skipped_steps"))
    assert _latest(save) == f"step_{last_good:08d}"


def test_run_ending_on_a_skipped_step_still_saves(dataset, tmp_path, world1):
    """The one save policy: train_steps == save_interval == 2 and a non-finite last step
    (LR 1e30: step 1 updates, step 2's loss is non-finite and skipped, 1 < max_bad_steps). The
    run ends normally (exit 0), so it must leave a checkpoint of its last step. Before the
    Checkpointer, the interval save skipped the bad step and the end save skipped a step that
    was a multiple of save_interval: exit 0 and no checkpoint at all."""
    save = tmp_path / "run"
    args = _args(
        dataset,
        save,
        2,
        "checkpoint.save_interval=2",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.clip_grad=0",
        "max_bad_steps=5",
    )
    rc, out = _train1(world1, args)
    assert rc == 0, out
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1], recs
    assert _latest(save) == "step_00000002", out
    state = json.loads((save / "step_00000002" / "train_state.json").read_text())
    assert state["step"] == 2 and state["skipped_steps"] == 1 and state["consumed_samples"] == 16
    # Started again, the finished run says so and does not save its last step again.
    mtime = (save / "step_00000002" / "train_state.json").stat().st_mtime_ns
    rc, out = _train1(world1, args)
    assert rc == 0 and "already complete at step 2" in out, out
    assert (save / "step_00000002" / "train_state.json").stat().st_mtime_ns == mtime


def test_training_checkpoint_feeds_eval_and_export(dataset, reference_run, tmp_path, world1):
    """The tools read training checkpoints (model + optimizer + RNG state) directly."""
    ckpt = reference_run / _latest(reference_run)
    rc, out = world1.run(
        tool_in_process,
        "eval_loss",
        ["--ckpt", str(ckpt), "--data", str(dataset), "--out", str(tmp_path / "res.json")],
    )[0]
    assert rc == 0, out
    res = json.loads((tmp_path / "res.json").read_text())
    assert len(res["samples"]) == 203 and all(s["ce"] > 0 for s in res["samples"])
    # A run directory resolves to its newest checkpoint, as --resume does.
    rc, out = world1.run(
        tool_in_process,
        "convert_to_hf",
        # Synthetic data records no tokenizers: the weights alone (complete exports of
        # tokenized data: tests/hf/test_complete_export.py).
        ["--ckpt", str(reference_run), "--out", str(tmp_path / "hf"), "--weights-only"],
    )[0]
    assert rc == 0, out
    assert (tmp_path / "hf" / "config.json").is_file()
    # A truncated shard: an error naming the file, no traceback.
    import shutil

    bad = shutil.copytree(ckpt, tmp_path / "bad")
    shard = sorted(bad.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    for tool, extra in [
        ("eval_loss", ["--data", str(dataset)]),
        ("convert_to_hf", ["--out", str(tmp_path / "hf2"), "--weights-only"]),
    ]:
        rc, out = world1.run(tool_in_process, tool, ["--ckpt", str(bad), *extra])[0]
        assert rc != 0 and str(shard) in out and "Traceback" not in out, (tool, out)


def test_fp16_loss_scale_calibration_and_bf16_recompute(dataset, tmp_path, world1):
    """fp16: megatron-core's dynamic loss scale starts high; the overflow steps are skipped,
    logged with the new scale and do NOT count as bad steps; later steps update. bf16 with full
    recompute trains (world of one each)."""
    save = tmp_path / "fp16"
    args = _args(
        dataset,
        save,
        14,
        "checkpoint.save_interval=0",
        "precision.params_dtype=fp16",
        "max_bad_steps=2",
        "data.num_workers=0",
    )
    rc, out = _train1(world1, args)
    assert rc == 0, out
    assert "fp16 gradient overflow, loss scale now" in out
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in recs]
    assert scales[-1] < scales[0]
    assert recs[-1]["skipped_steps"] >= 2 and "grad_norm" in recs[-1]

    save = tmp_path / "bf16"
    args = _args(
        dataset,
        save,
        3,
        "checkpoint.save_interval=0",
        "precision.params_dtype=bf16",
        "recompute=full",
        "data.num_workers=0",
    )
    rc, out = _train1(world1, args)
    assert rc == 0, out
    assert all(math.isfinite(v) for v in _losses(save).values()) and len(_losses(save)) == 3


def test_resume_in_another_layout(dataset, reference_run, tmp_path, world1):
    """The PP=2 run's step-8 checkpoint continues in a world of one (TP=PP=DP=1): model,
    optimizer, scheduler and sampler state reshard, so step 9 sees the same batch and weights and
    its loss equals the reference run's step 9 up to reduction order."""
    save = tmp_path / "run"
    args = _args(
        dataset,
        save,
        STEPS,
        "checkpoint.save_interval=0",
        "exit_interval=9",
        f"checkpoint.resume={reference_run / 'step_00000008'}",
    )
    rc, out = _train1(world1, args)
    assert rc == 0, out
    assert "resumed from" in out and "layout TP=1 PP=1 DP=1" in out
    got, want = _losses(save), _losses(reference_run)
    assert sorted(got) == [9]
    assert abs(got[9] - want[9]) < 1e-5, (got[9], want[9])
    assert got[9] != want[8]  # not a re-run of the previous step


def test_interleaved_run_from_loaded_weights(dataset, reference_run, tmp_path, world2):
    """checkpoint.load (initial weights) + the interleaved schedule: PP=2 with two virtual
    chunks per stage (4 chunks of 1 layer) and plain PP=2, both starting from the reference
    run's step-4 weights, compute the same 4 steps; the interleaved run stops at step 2
    (exit_interval, a training checkpoint of 2 x 2 chunks) and resumes from it."""
    init = reference_run / "step_00000004"
    common = ["checkpoint.save_interval=0", f"checkpoint.load={init}", *LAYOUT]
    rc, out = _train2(world2, _args(dataset, tmp_path / "pp2", 4, *common))
    assert rc == 0, out
    assert "initial weights from" in out
    want = _losses(tmp_path / "pp2")
    vpp = _args(
        dataset,
        tmp_path / "vpp2",
        4,
        *common,
        "parallel.virtual_pipeline_parallel=2",
        "exit_interval=2",
    )
    rc, out = _train2(world2, vpp)
    assert rc == 0, out
    assert sorted(_losses(tmp_path / "vpp2")) == [1, 2]
    rc, out = _train2(world2, vpp + ["--resume", "auto"])
    assert rc == 0, out
    assert "resumed from" in out
    got = _losses(tmp_path / "vpp2")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, got, want)


def test_resume_is_exact_in_one_process_with_dropout(dataset, tmp_path, world1):
    """Resume at step 2 of 4 (world of one; the debug encoder has dropout 0.1): steps 3-4 equal
    the uninterrupted run bit for bit. Regression: the DataLoader iterator used to draw its
    worker seed from the global torch RNG (dropout's) after the RNG restore."""
    ref = tmp_path / "ref"
    rc, out = _train1(world1, _args(dataset, ref, 4, "checkpoint.save_interval=2"))
    assert rc == 0, out
    run = tmp_path / "run"
    args = _args(
        dataset, run, 4, "checkpoint.save_interval=0", f"checkpoint.resume={ref / 'step_00000002'}"
    )
    rc, out = _train1(world1, args)
    assert rc == 0, out
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == [3, 4]
    assert got == {3: want[3], 4: want[4]}


NO_DROPOUT = [
    f"model.{side}.{name}=0.0"
    for side in ("encoder", "decoder")
    for name in ("dropout", "attention_dropout", "activation_dropout")
]


def _metrics(save) -> dict[int, dict]:
    out = {}
    for line in (Path(save) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def test_packing_trains_the_same_samples_with_fewer_slots(dataset, tmp_path, world1):
    """data.packing=true: the first step's loss (same samples, same weights) equals the padded
    run's; per-key losses too; the useful-token fractions are logged and higher packed."""
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    # Crops the synthetic lengths (prompts 15-60, targets 8-120) hardly touch, so they vary.
    crops = ["data.batch.max_prompt_tokens=64", "data.batch.max_target_tokens=128"]
    rows = ["data.packing_encoder_length=96", "data.packing_decoder_length=160"]
    for save, extra in ((padded, []), (packed, ["data.packing=true", *rows])):
        rc, out = _train1(world1, _args(dataset, save, 2, *NO_DROPOUT, *crops, *extra))
        assert rc == 0, out
    a, b = _metrics(padded), _metrics(packed)
    assert abs(a[1]["loss"] - b[1]["loss"]) < 1e-5
    keys = [k for k in a[1] if k.startswith("loss/")]
    assert keys and all(abs(a[1][k] - b[1][k]) < 1e-5 for k in keys)
    # Step 2 runs on weights that differ only by reduction-order noise of step 1's update.
    assert abs(a[2]["loss"] - b[2]["loss"]) < 1e-4
    for side in ("encoder", "decoder"):
        assert 0 < a[1][f"data/useful_{side}"] <= 1 and 0 < b[1][f"data/useful_{side}"] <= 1
        assert b[1][f"data/useful_{side}"] > a[1][f"data/useful_{side}"]
    assert "packed rows 96 / 160 tokens" in out


def test_packing_resume_is_bit_identical(dataset, tmp_path, world2):
    """Packed run at PP=2 with dropout: resume at step 2 of 4 gives steps 3-4 bit for bit."""
    ref = tmp_path / "ref"
    packing = ["data.packing=true", *LAYOUT]
    rc, out = _train2(world2, _args(dataset, ref, 4, "checkpoint.save_interval=2", *packing))
    assert rc == 0, out
    run = tmp_path / "run"
    args = _args(
        dataset,
        run,
        4,
        "checkpoint.save_interval=0",
        f"checkpoint.resume={ref / 'step_00000002'}",
        *packing,
    )
    rc, out = _train2(world2, args)
    assert rc == 0, out
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == [3, 4]
    assert got == {3: want[3], 4: want[4]}


def test_compiled_layers_train_like_eager(dataset, tmp_path, world1):
    """compile.enable through the trainer (aot_eager: the tracing, eager kernels): the same
    losses as the eager run, step after step."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    on = ["compile.enable=true", "compile.backend=aot_eager"]
    for save, extra in ((eager, []), (compiled, on)):
        rc, out = _train1(world1, _args(dataset, save, 3, *NO_DROPOUT, *extra))
        assert rc == 0, out
    assert "torch.compile (aot_eager): 6 transformer layers" in out
    a, b = _metrics(eager), _metrics(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (step, a[step], b[step])
