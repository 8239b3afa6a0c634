"""tools/benchmark.py on CPU with the debug presets (shape of the output, not speed): the JSON's
throughput numbers follow from its step time and the trainer's FLOP formula, the phases add up
to the step, the official-style model trains the same parameter set, layout errors name the
flags. Runs in-process on gloo pools (mmcap.testing.train.tool_in_process)."""

import gzip
import json
import math
import statistics

import pytest

from mmcap.testing import DistributedWorkers
from mmcap.testing.train import tool_in_process

FAST = ["--steps", "2", "--warmup", "1", "--prompt-tokens", "6", "--target-tokens", "8"]


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


def _bench(world, argv):
    return world.run(tool_in_process, "benchmark", [str(a) for a in argv])


def _check_throughput(r, prompt=6, target=8, peak=None):
    from mmcap.config import get_preset
    from mmcap.train.flops import step_flops

    step, n = r["step_time_s"], r["global_batch_size"]
    assert step > 0 and statistics.median(r["step_times_s"]) == pytest.approx(step)
    assert r["samples_per_s"] == pytest.approx(n / step)
    assert r["images_per_s"] == pytest.approx(n / step)
    assert r["target_tokens_per_s"] == pytest.approx(n * target / step)
    flops = n * step_flops(get_preset("debug-gemma"), prompt, target)
    assert r["model_tflop_per_step"] == pytest.approx(flops / 1e12)
    world = r.get("layout", {}).get("world_size", 1)
    assert r["tflops_per_gpu"] == pytest.approx(flops / step / world / 1e12)
    if peak is None:
        assert r["mfu"] is None  # CPU: no peak known
    else:
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / peak)
    assert r["peak_memory_gib"] > 0
    assert all(math.isfinite(x) for x in r["losses"])


def test_benchmark_json_single_process(world1, tmp_path):
    out = tmp_path / "out.json"
    ((code, text),) = _bench(
        world1,
        [
            "--preset",
            "debug-gemma",
            *FAST,
            "--micro-batch-size",
            "2",
            "--num-microbatches",
            "2",
            "--peak-tflops",
            "0.5",
            "--profile",
            "--json",
            out,
        ],
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    (r,) = data["results"]
    # --profile: one extra step under torch.profiler, not among the timed ones.
    assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 3
    (prof,) = r["profile_per_rank"]
    assert prof["wall_s"] > 0 and prof["aten_ops"] > 100 and prof["device_busy_s"] is None
    assert {"aten::mm", "aten::bmm"} & {o["name"] for o in prof["top_host"]}
    assert "profile of one step" in text and "top operators by self host time" in text
    assert r["impl"] == "mmcap" and r["global_batch_size"] == 4 and r["num_microbatches"] == 2
    assert r["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    _check_throughput(r, peak=0.5)
    phases = r["phases_s"]
    for key in ("vision", "encoder", "decoder.layers", "loss", "optimizer", "backward+other"):
        assert phases[key] > 0, (key, phases)
    # The forward phases and the optimizer never exceed the step they belong to.
    assert sum(phases.values()) == pytest.approx(r["step_time_mean_s"], rel=1e-6)
    assert data["environment"]["commit"] and data["config"]["preset"] == "debug-gemma"
    for label in ("step time", "target tokens/s", "TFLOP/s per GPU", "MFU", "optimizer"):
        assert label in text


def test_compare_hf_trains_the_same_parameters(world1, tmp_path):
    out = tmp_path / "cmp.json"
    ((code, text),) = _bench(
        world1,
        ["--preset", "debug-gemma", *FAST, "--precision", "fp32", "--compare", "hf", "--json", out],
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    mm, hf = data["results"]
    assert (mm["impl"], hf["impl"]) == ("mmcap", "hf-official-style")
    _check_throughput(hf)
    assert data["ratio_mmcap_over_official"] == pytest.approx(hf["step_time_s"] / mm["step_time_s"])
    assert "throughput ratio mmcap / official-style" in text
    # Same trainable set: mmcap's decoder embedding is padded to padded_vocab_size rows.
    from mmcap.config import get_preset

    dec = get_preset("debug-gemma").decoder
    pad_rows = dec.padded_vocab_size() - dec.vocab_size
    assert hf["trainable_params"] == mm["trainable_params"] - pad_rows * dec.hidden_size
    # fp32, same data distribution: both start near ln(V) (random init), neither diverges.
    for r in (mm, hf):
        assert abs(r["losses"][0] - math.log(dec.vocab_size)) < 2.0, r["losses"]


def test_layout_error_names_the_flags(world1):
    ((code, text),) = _bench(world1, ["--preset", "debug-gemma", *FAST, "--tp", "2"])
    assert code == 2
    assert "--tp 2" in text and "torchrun" in text


def test_batch_flags_are_exclusive(world1):
    ((code, text),) = _bench(world1, ["--global-batch-size", "4", "--num-microbatches", "2"])
    assert code == 2 and "not allowed with argument" in text


@pytest.mark.slow
def test_pipeline_layout_phases_per_rank(tmp_path):
    """PP=2 on two ranks: stage 0 holds vision + encoder, stage 1 the loss; the table and JSON
    report the slowest rank per phase."""
    out = tmp_path / "pp.json"
    with DistributedWorkers(2, timeout=600) as w:
        res = _bench(
            w,
            [
                "--preset",
                "debug-gemma",
                *FAST,
                "--pp",
                "2",
                "--precision",
                "fp32",
                "--num-microbatches",
                "2",
                "--profile-trace",
                tmp_path / "trace.json.gz",
                "--json",
                out,
            ],
        )
    assert [c for c, _ in res] == [0, 0], res
    r = json.loads(out.read_text())["results"][0]
    assert len(r["profile_per_rank"]) == 2  # --profile-trace implies --profile
    for rank in (0, 1):
        with gzip.open(tmp_path / f"trace.rank{rank}.json.gz") as f:
            assert json.load(f)["traceEvents"]
    assert r["layout"] == {"tp": 1, "pp": 2, "dp": 1, "world_size": 2}
    first, last = r["phases_s_per_rank"]
    assert first["vision"] > 0 and first["encoder"] > 0 and first["loss"] == 0
    assert last["vision"] == 0 and last["encoder"] == 0 and last["loss"] > 0
    assert r["phases_s"]["vision"] == first["vision"] and r["phases_s"]["loss"] == last["loss"]
    _check_throughput(r)


def test_official_style_model_is_eager_train_mode_with_frozen_tower():
    import torch

    from mmcap.bench.hf_reference import build_hf_model
    from mmcap.config import get_preset

    model = build_hf_model(get_preset("debug-florence"), torch.float32, "cpu")
    impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert impls == {"eager"}
    assert model.model.vision_tower.training  # frozen, but left in train mode (official)
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_tower", "multi_modal_projector"}  # Florence: all else trains


def test_attention_only_cli(world1, tmp_path):
    out = tmp_path / "att.json"
    ((code, text),) = _bench(world1, ["--attention-only", "--target-tokens", "8", "--json", out])
    assert code == 0, text
    rows = json.loads(out.read_text())["attention"]
    assert {r["backend"] for r in rows} == {"math"}  # CPU default: math only
    assert len(rows) == 4 and all(r["tflops"] > 0 for r in rows)
    assert "fwd+bwd ms" in text


def test_benchmark_with_compiled_layers(world1, tmp_path):
    """--compile [backend]: the trainer's compile.enable on the benchmark's model (compiled in
    the warmup); the result says so."""
    out = tmp_path / "out.json"
    argv = ["--preset", "debug-gemma", *FAST, "--compile", "aot_eager", "--json", out]
    ((code, text),) = _bench(world1, argv)
    assert code == 0, text
    (r,) = json.loads(out.read_text())["results"]
    assert r["impl"] == "mmcap compiled-aot_eager"
    _check_throughput(r)
