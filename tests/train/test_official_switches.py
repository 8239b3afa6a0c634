"""The trainer's official-behaviour switches (README "Official behaviours"): which parameters
decay (``optim.weight_decay_rule``) and how the loss is averaged (``optim.loss_averaging``)."""

import pytest
import torch

from mmcap.config import PrecisionConfig
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


def _decay_by_name(rule):
    from megatron.core.optimizer import OptimizerConfig

    from mmcap.config import ParallelConfig
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.step import build_optimizer, wrap_model
    from tests.train.test_step_layouts import _cfg

    initialize_model_parallel(ParallelConfig(), seed=1)
    model = build_model(_cfg("debug-gemma"), precision=FP32)
    chunks = wrap_model([model])
    cfg = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, use_distributed_optimizer=True)
    opt = build_optimizer(chunks, cfg, rule)
    names = {id(p): n for n, p in model.named_parameters()}
    by_param = {}
    # megatron keeps, per optimizer param group, the model parameters it covers
    for o in getattr(opt, "chained_optimizers", [opt]):
        for gi, group in enumerate(o.optimizer.param_groups):
            wd = group.get("wd_mult", 1.0)
            for model_param in o.model_fp32_groups[gi] + o.model_float16_groups[gi]:
                by_param[names[id(model_param)]] = wd
    return by_param


@pytest.mark.parametrize("rule", ["megatron", "official"])
def test_weight_decay_rule(world1, rule):
    wd = world1.run(_decay_by_name, rule)[0]
    gate = next(n for n in wd if n.endswith("cross_attention.gate"))
    rms = next(n for n in wd if "cross_attention.post_norm" in n)
    bart_ln = next(n for n in wd if n.startswith("encoder.") and "layernorm" in n and n.endswith("weight"))
    bias = next(n for n in wd if n.endswith(".bias"))
    matrix = next(n for n in wd if n.endswith("linear_q.weight"))
    assert wd[bias] == 0.0 and wd[bart_ln] == 0.0 and wd[matrix] == 1.0
    if rule == "megatron":  # 1-D parameters never decay
        assert wd[gate] == 0.0 and wd[rms] == 0.0
    else:  # official: only biases and nn.LayerNorm weights are exempt
        assert wd[gate] == 1.0 and wd[rms] == 1.0


def _sgd_delta(mbs, loss_averaging):
    from megatron.core.optimizer import OptimizerConfig

    from mmcap.config import ParallelConfig
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.step import build_optimizer, train_step, wrap_model
    from tests.train.test_step_layouts import _cfg

    cfg = _cfg("debug-gemma")
    initialize_model_parallel(ParallelConfig(), seed=1)
    torch.manual_seed(0)
    model = build_model(cfg, precision=FP32)
    for n, p in model.named_parameters():
        if n.endswith(".gate"):
            p.data.fill_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    chunks = wrap_model([model], use_distributed_optimizer=False)
    ocfg = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=0.0)
    opt = build_optimizer(chunks, ocfg)
    train_step(chunks, opt, mbs, encoder_hidden=cfg.encoder.hidden_size, loss_averaging=loss_averaging)
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters() if p.requires_grad}


def _check_averaging():
    from tests.train.test_step_layouts import _batch, _cfg

    mbs = _batch(_cfg("debug-gemma"))  # 4 micro-batches with different target token counts
    assert len({int((mb.labels != -100).sum()) for mb in mbs}) > 1
    got = _sgd_delta(mbs, "per_microbatch")
    each = [_sgd_delta([mb], "global_token") for mb in mbs]  # one micro-batch: its token mean
    glob = _sgd_delta(mbs, "global_token")
    worst = max((got[n] - sum(d[n] for d in each) / len(each)).abs().max().item() for n in got)
    differs = max((got[n] - glob[n]).abs().max().item() for n in got)
    return worst, differs


def test_per_microbatch_loss_averages_microbatch_means(world1):
    worst, differs = world1.run(_check_averaging)[0]
    assert worst < 1e-6  # the mean of the micro-batches' own token-mean gradients
    assert differs > 1e-5  # and not the global token mean
