"""Generation under tensor parallelism (gloo, TP=2): every rank produces the tokens of the
single-process model (cached, greedy and beam 4), both families."""

import dataclasses

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset, replace
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")


def _generate(preset: str, tp: int):
    from mmcap.generate import GenerationConfig, generate
    from mmcap.model.build import build_model
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import full_state_dict, load_full_state_dict

    cfg = get_preset(preset)
    if cfg.decoder.arch == "gemma2":
        cfg = replace(cfg, decoder=dataclasses.replace(cfg.decoder, sliding_window=4))
    initialize_model_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(0)
    full = full_state_dict(build_model(cfg, precision=FP32))
    for name, t in full.items():
        if name.endswith(".gate"):
            full[name] = torch.ones_like(t)
        elif ".cross_attention.linear_" in name and name.endswith("weight"):
            full[name] = t * 10.0
    initialize_model_parallel(ParallelConfig(tensor_parallel=tp), seed=1234)
    model = build_model(cfg, ParallelConfig(tensor_parallel=tp), FP32).eval()
    load_full_state_dict(model, full)
    g = torch.Generator().manual_seed(2)
    size = cfg.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    prompt = torch.randint(3, 400, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = {}
    for beams in (1, 4):
        c = GenerationConfig(num_beams=beams, max_new_tokens=12, forced_eos_token_id=None)
        out[beams] = generate(model, prompt, mask, pixel_values=pixels, config=c)
    return out


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(2, timeout=600) as w:
        yield w


@pytest.mark.parametrize("preset", ["debug-florence", "debug-gemma"])
def test_tp2_generates_the_tp1_tokens(workers, preset):
    ref = workers.run(_generate, preset, 1)[0]
    assert max(len(t) for t in ref[4]) > 4  # longer than the window
    for got in workers.run(_generate, preset, 2):
        assert got == ref
