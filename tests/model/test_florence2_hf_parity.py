"""Parity of the whole Florence-size model with transformers' Florence2ForConditionalGeneration.

A tiny random HF model is converted with mmcap's key tables (vision: mmcap.model.vision.hf_keys;
BART encoder / decoder: mmcap.hf.florence2_keys); the same pixels and prompt ids must give the
same image tokens, encoder output and decoder logits. Tolerance 1e-4 (fp32) is the issue's bound.

The paper's Florence sizes cap the final logits, ``30 * tanh(logits / 30)`` (official
models/florence2.py; transformers' native class has no cap), so the reference side applies the
cap to the native logits. The last decoder layer's output norm is scaled up so that logits reach
the range where the cap matters (a missing cap fails the test by far more than the tolerance).
"""

import pytest
import torch

from mmcap.config import PrecisionConfig
from mmcap.hf.florence2_keys import bart_from_hf, bart_to_hf, model_config_from_hf
from mmcap.model.captioner import CaptioningModel
from mmcap.model.vision import vision_from_hf
from mmcap.parallel.tp import load_full_state_dict
from mmcap.testing.hf_models import tiny_florence2

IMAGE_TOKEN = 999
IMAGE_SIZE = 64  # grid 2x2 -> 5 image tokens
CAP = 30.0  # official Florence-2 language model


def _capped(logits: torch.Tensor) -> torch.Tensor:
    return CAP * torch.tanh(logits / CAP)


@pytest.fixture(scope="module")
def hf_model():
    model = tiny_florence2(seed=0, image_token_id=IMAGE_TOKEN)
    with torch.no_grad():  # logits of tens, not ~1: the cap then changes them visibly
        model.model.language_model.decoder.layers[-1].final_layer_norm.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def model_cfg(hf_model):
    return model_config_from_hf(hf_model.config, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def ours(single_rank_parallel_state, hf_model, model_cfg):
    model = CaptioningModel(model_cfg, precision=PrecisionConfig("fp32")).eval()
    sd = hf_model.state_dict()
    full = {f"vision.{k}": v for k, v in vision_from_hf(sd, "hf").items()}
    full.update(bart_from_hf(sd, model_cfg, "hf"))
    load_full_state_dict(model, full)
    return model


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    prompt = torch.randint(3, 900, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.bool)
    prompt_mask[1, 4:] = False  # second prompt is padded
    dec_ids = torch.randint(3, 900, (2, 7), generator=g)
    return pixels, prompt, prompt_mask, dec_ids


def _hf_forward(hf_model, cfg, pixels, prompt, prompt_mask, dec_ids):
    n = cfg.vision.num_image_tokens
    b = prompt.shape[0]
    input_ids = torch.cat([torch.full((b, n), IMAGE_TOKEN), prompt], dim=1)
    mask = torch.cat([torch.ones(b, n, dtype=torch.long), prompt_mask.long()], dim=1)
    with torch.no_grad():
        return hf_model(
            input_ids=input_ids, pixel_values=pixels, attention_mask=mask, decoder_input_ids=dec_ids
        )


def test_key_table_round_trip(hf_model, model_cfg):
    sd = hf_model.state_dict()
    back = bart_to_hf(bart_from_hf(sd, model_cfg, "hf"), model_cfg, "hf")
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    lm = [k for k in sd if k.startswith("model.language_model.") and "shared" not in k]
    assert set(lm) == set(back)


def test_image_tokens_encoder_and_logits_match_hf(ours, hf_model, model_cfg):
    pixels, prompt, prompt_mask, dec_ids = _inputs(model_cfg)
    ref = _hf_forward(hf_model, model_cfg, pixels, prompt, prompt_mask, dec_ids)
    with torch.no_grad():
        tokens = ours.vision(pixels)
        hf_tokens = hf_model.model.get_image_features(pixels).pooler_output
        enc, enc_mask = ours.encode(prompt, prompt_mask, pixels)
        logits = ours(prompt, dec_ids, prompt_mask, pixel_values=pixels)
    assert tokens.shape == (2, model_cfg.vision.num_image_tokens, 64)
    assert (tokens - hf_tokens).abs().max().item() <= 1e-4
    # Padded prompt positions of the encoder output are not compared (HF computes them too,
    # but nothing reads them); every real position must match.
    valid = enc_mask.transpose(0, 1)[..., None]
    diff = ((enc - ref.encoder_last_hidden_state.transpose(0, 1)) * valid).abs().max().item()
    assert diff <= 1e-4
    assert model_cfg.decoder.final_logit_softcap == CAP
    assert (_capped(ref.logits) - ref.logits).abs().max().item() > 1.0  # the cap matters here
    assert (logits - _capped(ref.logits)).abs().max().item() <= 1e-4


def test_loss_matches_hf_cross_entropy(ours, hf_model, model_cfg):
    pixels, prompt, prompt_mask, dec_ids = _inputs(model_cfg, seed=1)
    labels = torch.randint(3, 900, dec_ids.shape)
    labels[0, -2:] = -100
    ref = _hf_forward(hf_model, model_cfg, pixels, prompt, prompt_mask, dec_ids)
    expected = torch.nn.functional.cross_entropy(
        _capped(ref.logits).transpose(1, 2), labels, reduction="none"
    )
    uncapped = torch.nn.functional.cross_entropy(
        ref.logits.transpose(1, 2), labels, reduction="none"
    )
    assert (expected - uncapped).abs().max().item() > 1e-2
    with torch.no_grad():
        tok = ours(prompt, dec_ids, prompt_mask, pixel_values=pixels, labels=labels)
    assert (tok - expected).abs().max().item() <= 1e-4
    assert (tok[0, -2:] == 0).all()
