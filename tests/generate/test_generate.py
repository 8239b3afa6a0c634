"""Generation on mmcap's model: the KV-cached decode gives exactly the tokens of full
recomputation (greedy and beam, both families, sliding windows shorter than the output), and
the search's pieces behave as transformers' (n-gram ban, prompt grouping)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmcap.config import PrecisionConfig, get_preset, replace
from mmcap.generate import GenerationConfig, generate, generate_group
from mmcap.generate.search import process_scores
from mmcap.model.build import build_model

NEW_TOKENS = 14  # > the 4-slot sliding window set below (debug-gemma default: 8)


def _model(preset: str, seed: int):
    torch.manual_seed(seed)
    cfg = get_preset(preset)
    if cfg.decoder.arch == "gemma2":
        cfg = replace(cfg, decoder=dataclasses.replace(cfg.decoder, sliding_window=4))
    model = build_model(cfg, precision=PrecisionConfig("fp32")).eval()
    with torch.no_grad():  # open gates, strong cross-attention: the image and prompt matter
        for name, p in model.decoder.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
            elif ".cross_attention.linear_" in name and name.endswith("weight"):
                p.mul_(10.0)
    return model, cfg


def _inputs(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    pixels = torch.randn(b, 3, size, size, generator=g)
    prompt = torch.randint(3, 400, (b, 6), generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return pixels, prompt, mask


@pytest.fixture(scope="module", params=["debug-gemma", "debug-florence"])
def family(request, single_rank_parallel_state):
    return _model(request.param, seed=3)


@pytest.mark.parametrize("beams", [1, 4])
def test_cached_equals_uncached(family, beams):
    model, cfg = family
    pixels, prompt, mask = _inputs(cfg)
    dec = torch.tensor([[1, 2, 17, 18]] * 3)  # start, bos, a two-token prefix
    gen = GenerationConfig(num_beams=beams, max_new_tokens=NEW_TOKENS, forced_eos_token_id=None)
    out = {}
    for use_cache in (True, False):
        c = dataclasses.replace(gen, use_cache=use_cache)
        out[use_cache] = generate_group(model, prompt, mask, dec, c, pixel_values=pixels)
    assert torch.equal(out[True], out[False])
    # The test must be able to fail: outputs are long, differ between samples.
    assert out[True].shape[1] > 4 + 8
    assert not torch.equal(out[True][0], out[True][2])


def test_groups_by_prompt_length_and_strip(family):
    model, cfg = family
    pixels, prompt, mask = _inputs(cfg)
    gen = GenerationConfig(num_beams=1, max_new_tokens=6)
    prefixes = [None, [17, 18], None]
    mixed = generate(model, prompt, mask, pixel_values=pixels, prefix_ids=prefixes, config=gen)
    for i, prefix in enumerate(prefixes):
        alone = generate(
            model, prompt[i : i + 1], mask[i : i + 1], pixel_values=pixels[i : i + 1],
            prefix_ids=[prefix], config=gen,
        )
        assert mixed[i] == alone[0]
        assert gen.eos_token_id not in mixed[i] and len(mixed[i]) <= 6


def test_no_repeat_ngram_bans_like_hf():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (6, 12), generator=g)
    scores = torch.randn(6, 5, generator=g)
    for n in (1, 2, 3):
        cfg = GenerationConfig(no_repeat_ngram_size=n, forced_bos=False, forced_eos_token_id=None)
        ours = process_scores(tokens, scores.clone(), cfg, max_length=100)
        ref = NoRepeatNGramLogitsProcessor(n)(tokens, scores.clone())
        assert torch.equal(ours, ref)
        assert torch.isinf(ours).any()


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
