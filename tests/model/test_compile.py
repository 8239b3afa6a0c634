"""compile.enable: torch.compile of the transformer layers (mmcap.model.compile) gives the eager
model's losses and gradients (bit for bit through aot_eager, within float32 rounding through
inductor), keeps one graph per layer without recompute (no graph breaks: megatron-core's
RowParallelLinear warning and the attention log are kept out of the trace), shares compiled
code across layers and does not recompile for every new sequence length; TP=2 (with and without
sequence parallelism) on gloo too."""

import pytest
import torch

from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig, get_preset
from mmcap.config.model import replace

B, P = 2, 8
OFF = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def _cfg(preset: str, layers: int | None = None):
    base = get_preset(preset)
    dec = replace(base.decoder, **OFF, **({"num_layers": layers} if layers else {}))
    return replace(base, encoder=replace(base.encoder, **OFF), decoder=dec)


def _pair(cfg, recompute=None):
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel

    models = []
    for _ in range(2):
        initialize_model_parallel(ParallelConfig(), seed=1)
        models.append(build_model(cfg, ParallelConfig(), PrecisionConfig("fp32"),
                                  recompute=recompute).train())  # fmt: skip
    models[1].load_state_dict(models[0].state_dict())
    return models


def _step(model, cfg, target: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    model.zero_grad(set_to_none=True)
    loss = model(
        torch.randint(3, 900, (B, P), generator=g),
        torch.randint(3, 900, (B, target), generator=g),
        pixel_values=torch.randn(B, 3, size, size, generator=g),
        labels=torch.randint(3, 900, (B, target), generator=g),
    )
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(eager, compiled, cfg, lengths, tol):
    for i, t in enumerate(lengths):
        (b, gb), (a, ga) = _step(compiled, cfg, t, i), _step(eager, cfg, t, i)
        assert (a - b).abs().max().item() <= tol, (t, "loss")
        assert ga.keys() == gb.keys()
        for n in ga:
            assert (ga[n] - gb[n]).abs().max().item() <= tol * max(1.0, ga[n].abs().max()), n


@pytest.fixture
def dynamo_counters():
    from torch._dynamo.utils import counters

    from mmcap.ops.attention import registry

    torch._dynamo.reset()
    counters.clear()
    registry._logged_choices.clear()  # the first (compiled) call is the one that would log
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_compiled_layers_equal_eager_in_one_graph(single_rank_parallel_state, dynamo_counters,
                                                  preset):  # fmt: skip
    from mmcap.model.compile import compile_layers, compiled_layer_classes

    cfg = _cfg(preset, layers=8)
    eager, compiled = _pair(cfg)
    keys = list(compiled.state_dict())
    n = compile_layers([compiled], backend="aot_eager")
    assert n == cfg.encoder.num_layers + 8
    assert list(compiled.state_dict()) == keys  # names / checkpoints unchanged
    assert all(getattr(m, "_mmcap_compiled", False) for m in compiled.modules()
               if isinstance(m, compiled_layer_classes()))  # fmt: skip
    _compare(eager, compiled, cfg, lengths=(8, 16, 24, 12), tol=0.0)
    assert sum(dynamo_counters["graph_break"].values()) == 0, dict(dynamo_counters["graph_break"])
    # Layers of a class share code: per layer kind (encoder; Gemma sliding / global, or BART
    # decoder) one static graph, then one with dynamic lengths; never one per layer or length.
    kinds = 3 if preset == "debug-gemma" else 2
    assert dynamo_counters["stats"]["unique_graphs"] <= 2 * kinds, dict(dynamo_counters["stats"])


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_compiled_layers_with_recompute_equal_eager(single_rank_parallel_state, dynamo_counters,
                                                    recompute):  # fmt: skip
    """megatron-core's checkpointing (RNG state save) breaks the graph; the results stay those
    of eager up to float32 accumulation order (gradients summed in another order)."""
    from mmcap.model.compile import compile_layers

    cfg = _cfg("debug-gemma")
    eager, compiled = _pair(cfg, recompute=recompute)
    compile_layers([compiled], backend="aot_eager")
    _compare(eager, compiled, cfg, lengths=(8, 16), tol=1e-5)


def test_inductor_matches_eager(single_rank_parallel_state, dynamo_counters):
    """The real backend (fused C++ kernels on CPU, Triton on CUDA): float32 rounding only."""
    from mmcap.model.compile import compile_layers

    cfg = _cfg("debug-gemma")
    eager, compiled = _pair(cfg)
    compile_layers([compiled], backend="inductor")
    _compare(eager, compiled, cfg, lengths=(8,), tol=1e-4)


def test_config_and_refusals(single_rank_parallel_state, monkeypatch):
    from mmcap.model.build import build_model
    from mmcap.model.compile import CompileConfig, compile_layers
    from mmcap.train.overrides import load_train_config

    cfg = load_train_config("debug-gemma", None, ["compile.enable=true", "compile.backend=eager"])
    assert cfg.compile == CompileConfig(enable=True, backend="eager")
    with pytest.raises(ConfigError, match="compile.backend"):
        load_train_config("debug-gemma", None, ["compile.backend=cudagraphs"])
    model = build_model(get_preset("debug-gemma"), ParallelConfig(), PrecisionConfig("fp32"))
    layer = model.decoder.layers[0]
    monkeypatch.setattr(layer.config, "transformer_impl", "transformer_engine")
    with pytest.raises(ConfigError, match="compile.enable"):
        compile_layers([model], backend="eager")


def test_flex_attention_stays_its_own_compiled_call(single_rank_parallel_state, dynamo_counters,
                                                    monkeypatch):  # fmt: skip
    """With flex attention (CUDA's back-end for Gemma's soft-capped attention; forced here, and
    forward only: flex has no CPU backward) a compiled layer breaks its graph exactly around the
    flex call, which runs through the standalone compiled flex_attention; results unchanged."""
    from mmcap.model.compile import compile_layers

    monkeypatch.setenv("MMCAP_ATTN_BACKEND", "flex")
    cfg = _cfg("debug-gemma")
    eager, compiled = _pair(cfg)
    compile_layers([compiled], backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    for t in (8, 16):
        ids = torch.randint(3, 900, (B, P), generator=g)
        args = (ids, torch.randint(3, 900, (B, t), generator=g))
        kw = {"pixel_values": torch.randn(B, 3, size, size, generator=g),
              "labels": torch.randint(3, 900, (B, t), generator=g)}  # fmt: skip
        with torch.no_grad():
            assert torch.equal(compiled(*args, **kw), eager(*args, **kw))
    breaks = dynamo_counters["graph_break"]
    assert breaks and all("flex_forward" in reason for reason in breaks), list(breaks)


def _tp_case(sp: bool):
    """TP=2 (gloo) with and without sequence parallelism: compiled layers (megatron-core's TP
    collectives inside the traced forward) give eager's loss and full gradients."""
    from mmcap.model.build import build_model
    from mmcap.model.compile import compile_layers
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import allreduce_sequence_parallel_grads, full_grads

    cfg = _cfg("debug-gemma")
    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=sp)
    out = []
    for compiled in (False, True):
        initialize_model_parallel(parallel, seed=1)
        model = build_model(cfg, parallel, PrecisionConfig("fp32")).train()
        if compiled:
            compile_layers([model], backend="aot_eager")
        loss, _ = _step(model, cfg, 16, 0)
        allreduce_sequence_parallel_grads(model)
        out.append((loss, full_grads(model)))
    (a, ga), (b, gb) = out
    return (a - b).abs().max().item(), max((ga[n] - gb[n]).abs().max().item() for n in ga)


def test_compiled_layers_under_tensor_parallelism():
    """(float32; the gradients differ by summation order only, ~4e-6 with SP)"""
    from mmcap.testing import DistributedWorkers

    with DistributedWorkers(2, timeout=600) as workers:
        for sp in (False, True):
            for loss_err, grad_err in workers.run(_tp_case, sp):
                assert loss_err <= 1e-6 and grad_err <= 1e-5, (sp, loss_err, grad_err)
