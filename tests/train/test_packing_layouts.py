"""Sequence packing under TP / PP / DP (gloo, fp32): a training step on packed rows gives the
same loss and the same update (= gradient: SGD, lr 1) as the same samples padded on one rank,
for both model families, with a Gemma sliding window shorter than the documents.

Packed micro-batches hold rows, so their number differs from the padded run's (and between DP
ranks); megatron-core's per-token loss makes the step independent of that.
"""

import dataclasses

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")
N = 8


def _cfg(preset):
    cfg = get_preset(preset)
    no_drop = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    dec = dataclasses.replace(cfg.decoder, **no_drop)
    if dec.arch == "gemma2":
        dec = dataclasses.replace(dec, sliding_window=4)
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **no_drop), decoder=dec)


def _microbatches(cfg, packed: bool, dp: int, rank: int):
    from mmcap.testing.packing import Samples, pack, padded_microbatches, random_samples

    s = random_samples(cfg, N, seed=5)
    per = N // dp
    sl = slice(rank * per, (rank + 1) * per)
    t = s.tokens
    mine = Samples(
        type(t)(*(getattr(t, f)[sl] for f in t.__dataclass_fields__)),
        s.has_image[sl],
        s.key[sl],
        s.pixels[sl],
    )
    if not packed:
        return padded_microbatches(mine, cfg, 2)
    n = cfg.vision.num_image_tokens
    return pack(mine, cfg, enc_row=2 * n + 30, dec_row=28, rows_per_mb=1)[1]


def _step(preset, tp, pp, sp, packed):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig

    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import full_state_dict, gather_full, load_full_state_dict
    from mmcap.train.step import build_optimizer, train_step, wrap_model

    cfg = _cfg(preset)
    initialize_model_parallel(ParallelConfig(), seed=1)
    torch.manual_seed(0)
    full = full_state_dict(build_model(cfg, precision=FP32))
    for k in full:
        if k.endswith(".gate"):
            full[k] = torch.full_like(full[k], 0.5)
    initialize_model_parallel(
        ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp), seed=1
    )
    model = build_model(cfg, ParallelConfig(tp, pp, sequence_parallel=sp), FP32)
    load_full_state_dict(model, {n: full[model.global_name(n)] for n, _ in model.named_parameters()})
    chunks = wrap_model([model], use_distributed_optimizer=False)
    ocfg = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=0.0)
    opt = build_optimizer(chunks, ocfg)
    mbs = _microbatches(cfg, packed, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    stats = train_step(chunks, opt, mbs, encoder_hidden=cfg.encoder.hidden_size)
    after = {
        model.global_name(n): gather_full(p) for n, p in model.named_parameters() if p.requires_grad
    }
    return stats.loss, stats.key_loss, after


@pytest.fixture(scope="module")
def pools():
    with (
        DistributedWorkers(1, timeout=600) as one,
        DistributedWorkers(2, timeout=600) as two,
        DistributedWorkers(4, timeout=600) as four,
    ):
        yield {1: one, 2: two, 4: four}


def _merge(results):
    loss = [r[0] for r in results if r[0] == r[0]]  # last-stage ranks report the loss
    params = {}
    for r in results:
        params.update(r[2])
    return loss[0], results[-1][1], params


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_packed_step_equals_padded_step_in_every_layout(pools, preset):
    ref_loss, ref_keys, ref = _merge(pools[1].run(_step, preset, 1, 1, False, False))
    layouts = [(1, 1, 1, False), (2, 2, 1, False), (2, 1, 2, False), (2, 1, 1, False)]
    if preset == "debug-gemma":
        layouts.append((4, 2, 2, True))
    for world, tp, pp, sp in layouts:
        loss, keys, got = _merge(pools[world].run(_step, preset, tp, pp, sp, True))
        layout = f"packed TP={tp} PP={pp} DP={world // (tp * pp)} SP={sp}"
        assert abs(loss - ref_loss) <= 1e-5, (layout, loss, ref_loss)
        assert keys.keys() == ref_keys.keys(), layout
        for k in keys:
            assert abs(keys[k] - ref_keys[k]) <= 1e-5, (layout, k)
        assert set(got) == set(ref), layout
        for k, v in ref.items():
            n = min(v.shape[0], got[k].shape[0])
            assert torch.allclose(got[k][:n], v[:n], atol=1e-5, rtol=1e-4), (
                f"{layout} {k}: {(got[k][:n] - v[:n]).abs().max():.3g}"
            )
