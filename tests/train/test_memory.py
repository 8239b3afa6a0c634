"""The per-GPU memory estimate (mmcap.train.memory), its CLI, and the example recipes.

- Static bytes equal hand counts from ``mmcap.model.size.count_parameters``: bf16 weights,
  fp32 gradients of the trainable parameters, 12 B of distributed-optimizer state per
  trainable parameter divided by DP.
- The activation model equals what autograd really saves: the bytes of the tensors saved
  for backward in a forward of the debug models (CPU, ``math`` attention back-end, the fused
  ops' autograd path via ``MMCAP_FUSED_OPS_ON_CPU=1``, found with
  ``torch.autograd.graph.saved_tensors_hooks``), at TP=1 and at TP=2 with and without
  sequence parallelism, without and with selective / full recompute. Tolerance 5% (the model
  ignores LayerNorm statistics and masks, and counts 1-byte CUDA dropout masks where CPU
  keeps them in bf16).
- examples/{pretrain,finetune}/*.yaml load, carry SYSTEM.md's hyper-parameters, split the
  global batch on 8 GPUs, and fit an H100 80GB with 10% headroom by this estimate.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.config.model import replace
from mmcap.testing import DistributedWorkers
from mmcap.train.memory import GIB, H100_80GB_BYTES, estimate_memory, stage_parameters

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples").glob("*/*.yaml"))
RECIPES = [p for p in RECIPES if p.parent.name in ("pretrain", "finetune")]
PRESETS = [
    "florence-2-base",
    "florence-2-large",
    "florence-gemma-2-large",
    "florence-gemma-2-xlarge",
]
BUDGET = 0.9 * H100_80GB_BYTES  # README: >= 10% headroom for CUDA context, NCCL, fragmentation
B, PROMPT, TARGET = 2, 31, 64  # 5 image tokens (64 px) + 31 = 36 encoder tokens: SP-divisible


def _layout(tp=1, pp=1, dp=1, sp=False):
    return ParallelConfig(
        tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp, data_parallel=dp
    )


def _nodrop(cfg):
    """Without dropout: CPU dropout keeps masks in the activation dtype (CUDA: bool)."""
    off = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
    return replace(cfg, encoder=replace(cfg.encoder, **off), decoder=replace(cfg.decoder, **off))


def _cases():
    gemma = get_preset("debug-gemma")
    return {
        "debug-gemma": gemma,
        "debug-florence": _nodrop(get_preset("debug-florence")),
        "gemma-decoder-trains": replace(gemma, trainable=replace(gemma.trainable, decoder="all")),
    }


def _saved_bytes(case: str, tp: int, sp: bool, recompute: str | None = None) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward,
    on the fused-op path (the custom ops of csrc/'s kernels, with their torch math on CPU:
    ``MMCAP_FUSED_OPS_ON_CPU=1``), which is what the GPU runs and the model describes."""
    import os

    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel

    before = os.environ.get("MMCAP_FUSED_OPS_ON_CPU")
    os.environ["MMCAP_FUSED_OPS_ON_CPU"] = "1"
    try:
        return _saved_bytes_fused(case, tp, sp, recompute)
    finally:  # later tests in this process expect the reference path
        if before is None:
            del os.environ["MMCAP_FUSED_OPS_ON_CPU"]
        else:
            os.environ["MMCAP_FUSED_OPS_ON_CPU"] = before


def _saved_bytes_fused(case: str, tp: int, sp: bool, recompute: str | None) -> int:
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel


    cfg = _cases()[case]
    parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
    initialize_model_parallel(parallel, seed=1)
    model = build_model(cfg, parallel, PrecisionConfig("bf16"), recompute=recompute).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(
            torch.randint(3, 900, (B, PROMPT), generator=g),
            torch.randint(3, 900, (B, TARGET), generator=g),
            pixel_values=torch.randn(B, 3, size, size, generator=g),
            labels=torch.randint(3, 900, (B, TARGET), generator=g),
        )
    return sum(saved.values())


def _estimated_saved(cfg, tp: int, sp: bool, recompute: str | None = None) -> int:
    est = estimate_memory(
        cfg,
        _layout(tp=tp, sp=sp),
        micro_batch_size=B,
        prompt_tokens=PROMPT,
        target_tokens=TARGET,
        recompute=recompute,
        attention="math",
    )
    parts = est["stages"][0]["bytes"]
    return parts["activations"] + parts["logits"]


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_static_bytes_equal_parameter_counts(single_rank_parallel_state, preset):
    from mmcap.model.size import count_parameters

    cfg = get_preset(preset)
    size = count_parameters(cfg)
    parts = estimate_memory(cfg, _layout(), micro_batch_size=1)["stages"][0]["bytes"]
    assert parts["weights"] == 2 * size.total  # bf16, frozen parameters included
    assert parts["grads"] == 4 * size.trainable  # fp32 buffer of trainable parameters only
    assert parts["optimizer"] == 12 * size.trainable  # fp32 main + exp_avg + exp_avg_sq
    fp32 = estimate_memory(cfg, _layout(), micro_batch_size=1, params_dtype="fp32")
    assert fp32["stages"][0]["bytes"]["optimizer"] == 8 * size.trainable  # main = param


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_per_rank_weights_equal_count_parameters(single_rank_parallel_state, tp, pp):
    from mmcap.model.size import count_parameters

    cfg = get_preset("debug-gemma")
    per_rank = count_parameters(cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    est = estimate_memory(cfg, _layout(tp=tp, pp=pp), micro_batch_size=1)
    for st in est["stages"]:
        assert st["bytes"]["weights"] == 2 * per_rank.per_rank[(st["stage"], 0)]
    stages = stage_parameters(cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    trainable = sum(s.trainable for s in stages)
    # TP splits every trainable tensor but the norms / gates / biases; the tied LM head is
    # counted twice with PP > 1 (first and last stage each hold and train a copy).
    assert trainable <= count_parameters(cfg).trainable * (2 if pp > 1 else 1)


def test_data_parallel_divides_optimizer_state_only(single_rank_parallel_state):
    cfg = get_preset("debug-gemma")
    one = estimate_memory(cfg, _layout(dp=1), micro_batch_size=2)["stages"][0]["bytes"]
    two = estimate_memory(cfg, _layout(dp=2), micro_batch_size=2)["stages"][0]["bytes"]
    assert abs(two["optimizer"] - one["optimizer"] / 2) <= 1
    assert {k: v for k, v in one.items() if k != "optimizer"} == {
        k: v for k, v in two.items() if k != "optimizer"
    }


def test_tensor_and_pipeline_parallel_reduce_weights(single_rank_parallel_state):
    cfg = get_preset("debug-gemma")

    def peak(part, **layout):
        est = estimate_memory(cfg, _layout(**layout), micro_batch_size=2)
        return max(st["bytes"][part] for st in est["stages"])

    assert peak("weights", tp=2) < peak("weights")
    assert peak("weights", pp=2) < peak("weights")
    assert peak("weights", tp=2, pp=2) < peak("weights", tp=2)
    assert peak("activations", tp=2, sp=True) < peak("activations", tp=2) < peak("activations")


@pytest.mark.parametrize("attention", ["flash", "math"])
def test_recompute_reduces_activations(single_rank_parallel_state, attention):
    cfg = get_preset("florence-gemma-2-large")

    def act(recompute):
        est = estimate_memory(
            cfg, _layout(dp=8), micro_batch_size=4, recompute=recompute, attention=attention
        )
        return est["stages"][0]["bytes"]["activations"]

    assert act(None) > act("selective") > act("full")
    if attention == "math":  # the s^2 scores are what selective recompute drops
        assert act("selective") < 0.9 * act(None)


def test_pipeline_first_stage_holds_pp_microbatches(single_rank_parallel_state):
    cfg = get_preset("debug-gemma")
    est = estimate_memory(cfg, _layout(pp=2), micro_batch_size=2, num_microbatches=8)
    assert [st["in_flight"] for st in est["stages"]] == [2, 1]
    assert est["stages"][0]["bytes"]["pipeline"] > 0 and est["stages"][1]["bytes"]["logits"] > 0
    est = estimate_memory(cfg, _layout(pp=2), micro_batch_size=2, num_microbatches=1)
    assert est["stages"][0]["in_flight"] == 1


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("case", list(_cases()))
def test_activation_model_equals_saved_tensors(single_rank_parallel_state, case, recompute):
    got = _saved_bytes(case, 1, False, recompute)
    est = _estimated_saved(_cases()[case], 1, False, recompute)
    print(f"{case} recompute={recompute}: saved {got} B, estimated {est} B ({est / got:.3f})")
    assert abs(est / got - 1) <= 0.05


def test_activation_model_equals_saved_tensors_tp2(single_rank_parallel_state):
    with DistributedWorkers(2, timeout=600) as workers:
        got = {sp: workers.run(_saved_bytes, "debug-gemma", 2, sp) for sp in (False, True)}
    for sp, per_rank in got.items():
        est = _estimated_saved(_cases()["debug-gemma"], 2, sp)
        print(f"TP=2 SP={sp}: saved {per_rank} B per rank, estimated {est} B")
        assert all(abs(est / g - 1) <= 0.05 for g in per_rank)
    assert max(got[True]) < max(got[False])


def test_cli_runs_on_debug_preset(tmp_path):
    out = tmp_path / "est.json"
    tool = ROOT / "tools" / "estimate_memory.py"
    args = ["--preset", "debug-gemma", "--tp", "2", "--pp", "2", "--dp", "2"]
    args += ["--micro-batch-size", "2", "--global-batch-size", "16", "--recompute", "selective"]
    run = subprocess.run(
        [sys.executable, str(tool), *args, "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "weights" in run.stdout and "pp1" in run.stdout and "fits" in run.stdout
    est = json.loads(out.read_text())
    assert [st["stage"] for st in est["stages"]] == [0, 1]
    assert est["layout"]["tensor_parallel"] == 2 and est["num_microbatches"] == 4
    assert est["fits"] and est["peak_bytes"] == max(st["total"] for st in est["stages"])
    search = subprocess.run(
        [sys.executable, str(tool), "--preset", "debug-florence", "--search", "--gpus", "4"]
        + ["--global-batch-size", "16"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert search.returncode == 0, search.stderr
    assert "layouts fit" in search.stdout


# --- examples/ recipes ----------------------------------------------------------------------


def test_every_preset_has_both_recipes():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    assert names >= {(kind, preset) for kind in ("pretrain", "finetune") for preset in PRESETS}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_matches_paper_and_fits_8_gpus(single_rank_parallel_state, path):
    from mmcap.train.overrides import load_train_config

    cfg = load_train_config(None, path, [])
    model = cfg.model_config()
    assert cfg.preset == path.stem
    assert cfg.precision.params_dtype == "bf16"
    assert cfg.optim.decay_style == "cosine" and cfg.optim.warmup_steps == 100
    assert cfg.optim.clip_grad == 1.0 and cfg.optim.min_lr == 0.0
    assert cfg.data.batch.max_prompt_tokens == 128 and cfg.data.batch.max_target_tokens == 128
    assert cfg.checkpoint.resume == "auto"
    if path.parent.name == "pretrain":  # SYSTEM.md "Training recipes": continued pretraining
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.01
        assert cfg.global_batch_size == 1024 and cfg.train_steps == 10000
        assert model.vision.image_size == 224 and model.vision.num_image_tokens == 50
        assert cfg.data.sampler.balancing == "task-lang-balancing"
    else:  # fine-tuning from the 10k-step checkpoint
        assert cfg.optim.lr == 5e-5 and cfg.optim.weight_decay == 0.05
        assert cfg.global_batch_size == 256 and cfg.train_steps == 5000
        assert model.vision.image_size == 768 and model.vision.num_image_tokens == 577
        assert cfg.data.sampler.balancing == "generalist-finetune"
        assert cfg.checkpoint.load and cfg.checkpoint.load.endswith("step_00010000")
    parallel = cfg.parallel
    dp = parallel.resolve_data_parallel(8)
    num_mb = cfg.num_microbatches(dp)  # raises unless micro x DP divides the global batch
    layout = replace(parallel, data_parallel=dp)
    est = estimate_memory(
        model,
        layout,
        micro_batch_size=cfg.micro_batch_size,
        recompute=cfg.recompute,
        num_microbatches=num_mb,
    )
    print(f"{path.parent.name}/{path.stem}: DP={dp} M={num_mb} {est['peak_bytes'] / GIB:.1f} GiB")
    assert est["peak_bytes"] <= BUDGET
    # The README / YAML comment states this estimate; keep them in sync.
    assert f"{est['peak_bytes'] / GIB:.1f} GiB" in path.read_text()
