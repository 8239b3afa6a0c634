"""save_pretrained -> transformers Auto classes -> same model, with no trust_remote_code.

``import mmcap.hf.register`` registers the config and model classes; loading then goes through
``AutoModelForImageTextToText`` (and the other registered Auto classes) for both families.
"""

import importlib
import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
)

from mmcap.hf import register
from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration, MmcapCaptionerModel
from mmcap.testing.hf_models import tiny_florence2, tiny_gemma2
from tests.hf._tiny import encoder_inputs, florence_family, gemma_family, set_gates


@pytest.fixture(scope="module")
def native():
    return tiny_florence2(seed=0)


@pytest.fixture(scope="module", params=["florence", "gemma2"])
def saved(request, native, tmp_path_factory):
    if request.param == "florence":
        model = florence_family(native, decoder_vocab_size=1200)
    else:
        model = gemma_family(native, tiny_gemma2(seed=0))
        set_gates(model, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def _logits(model):
    pixel_values, input_ids, attention_mask = encoder_inputs(model.config.image_token_id)
    dec = torch.randint(2, 1000, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=dec,
        ).logits


def test_register_is_idempotent():
    importlib.reload(register)
    register.register()
    assert AutoConfig.for_model("mmcap_captioner").__class__ is MmcapCaptionerConfig


def test_auto_image_text_to_text_round_trip(saved):
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mmcap_captioner"
    assert "auto_map" not in config  # registered classes, not remote code
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(loaded) is MmcapCaptionerForConditionalGeneration
    assert loaded.config.decoder_family == model.config.decoder_family
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.generation_config.decoder_start_token_id == 1
    assert loaded.generation_config.forced_eos_token_id is None


@pytest.mark.parametrize("auto", [AutoModelForSeq2SeqLM, AutoModelForPreTraining])
def test_other_auto_classes(saved, auto):
    _, path = saved
    assert type(auto.from_pretrained(path)) is MmcapCaptionerForConditionalGeneration


def test_auto_model_loads_base(saved):
    model, path = saved
    base = AutoModel.from_pretrained(path)
    assert type(base) is MmcapCaptionerModel
    for k, v in base.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v), k


def test_attention_back_ends(saved):
    """Florence family: sdpa as native Florence-2; Gemma family: eager only (soft-capping)."""
    model, path = saved
    if model.config.decoder_family == "florence":
        loaded = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
        assert loaded.model.language_model.decoder.config._attn_implementation == "sdpa"
        return
    assert model.model.language_model.decoder.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")


def test_config_round_trip_and_errors(saved, tmp_path):
    model, _ = saved
    model.config.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert back.to_diff_dict() == model.config.to_diff_dict()
    assert back.get_text_config(decoder=True).vocab_size == back.decoder_vocab_size
    assert back.get_text_config(encoder=True).vocab_size == back.encoder_vocab_size == 1000
    with pytest.raises(ValueError, match="decoder_family"):
        MmcapCaptionerConfig(decoder_family="t5")
    with pytest.raises(ValueError, match="gemma_config"):
        MmcapCaptionerConfig(decoder_family="gemma2")
