"""optim.implementation: torch's AdamW inside megatron-core's distributed optimizer runs fused
(default), foreach or for-loop (:func:`mmcap.train.step.set_adam_implementation`); the three
train the same (fp32, 3 steps, bound 1e-5 relative), the fused kernel is the one that runs, and
the choice must come before the first step."""

import pytest
import torch

from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig
from mmcap.testing import DistributedWorkers
from mmcap.train.optim_config import OptimConfig


def _train(implementation: str, steps: int = 3):
    from megatron.core.optimizer import OptimizerConfig

    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.step import build_optimizer, set_adam_implementation, train_step, wrap_model
    from tests.train.test_step_layouts import _batch, _cfg

    cfg = _cfg("debug-gemma")
    initialize_model_parallel(ParallelConfig(), seed=1)
    torch.manual_seed(0)
    model = build_model(cfg, precision=PrecisionConfig("fp32"))
    chunks = wrap_model([model])
    ocfg = OptimizerConfig(
        optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=True
    )
    opt = build_optimizer(chunks, ocfg, implementation=implementation)
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    flags = {(g["fused"], g["foreach"]) for o in inner for g in o.param_groups}

    fused_calls = []
    original = torch._fused_adamw_

    def counting(*args, **kwargs):
        fused_calls.append(len(args[0]))
        return original(*args, **kwargs)

    torch._fused_adamw_ = counting
    try:
        losses = []
        for step in range(steps):
            torch.manual_seed(100 + step)
            out = train_step(chunks, opt, _batch(cfg), encoder_hidden=cfg.encoder.hidden_size)
            assert out.update_successful
            losses.append(out.loss)
    finally:
        torch._fused_adamw_ = original
    steps_state = [s["step"] for o in inner for s in o.state.values()]
    late = None
    try:
        set_adam_implementation(opt, "foreach")
    except ValueError as e:
        late = str(e)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "losses": losses,
        "params": params,
        "flags": flags,
        "fused_calls": len(fused_calls),
        "groups": sum(1 for o in inner for g in o.param_groups if g["params"]),
        "step_values": sorted({float(s) for s in steps_state}),
        "late_error": late,
    }


@pytest.fixture(scope="module")
def results():
    with DistributedWorkers(1, timeout=600) as pool:
        yield {impl: pool.run(_train, impl)[0] for impl in ("fused", "foreach", "for-loop")}


def test_each_implementation_is_the_one_set(results):
    assert results["fused"]["flags"] == {(True, False)}
    assert results["foreach"]["flags"] == {(False, True)}
    assert results["for-loop"]["flags"] == {(False, False)}
    fused = results["fused"]  # one fused kernel call per step and parameter group (decay / not)
    assert fused["groups"] == 2 and fused["fused_calls"] == 3 * fused["groups"]
    assert results["foreach"]["fused_calls"] == results["for-loop"]["fused_calls"] == 0
    for r in results.values():
        assert r["step_values"] == [3.0]  # every parameter's Adam step counter
        assert "before the optimizer's first step" in r["late_error"]


def test_implementations_train_the_same(results):
    ref = results["for-loop"]
    for impl in ("fused", "foreach"):
        got = results[impl]
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=0)
        assert got["params"].keys() == ref["params"].keys()
        for name, p in got["params"].items():
            torch.testing.assert_close(p, ref["params"][name], rtol=1e-5, atol=1e-7, msg=name)
    moved = [
        (results["fused"]["params"][n] - p).abs().max().item()
        for n, p in _initial_params().items()
        if n in results["fused"]["params"]
    ]
    assert max(moved) > 1e-4  # the steps did update the parameters


def _initial_params():
    from mmcap.model.build import build_model
    from mmcap.parallel import destroy_model_parallel, initialize_model_parallel
    from tests.train.test_step_layouts import _cfg

    initialize_model_parallel(ParallelConfig(), seed=1)
    try:
        torch.manual_seed(0)
        model = build_model(_cfg("debug-gemma"), precision=PrecisionConfig("fp32"))
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        destroy_model_parallel()


def test_unknown_implementation_is_refused():
    from mmcap.train.step import set_adam_implementation

    with pytest.raises(ConfigError, match="optim.implementation: must be fused, foreach or"):
        OptimConfig(implementation="apex")
    with pytest.raises(ValueError, match="must be one of"):
        set_adam_implementation(object(), "fast")
