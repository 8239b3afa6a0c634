"""Tiny mmcap HF captioners built from tiny random transformers models (no hub), for tests/hf.

The Florence family copies a native ``Florence2ForConditionalGeneration`` (its ``shared`` table
becomes both embed_tokens); the Gemma family takes the vision tower + BART encoder of the
Florence-2 model and the decoder of a ``Gemma2ForCausalLM``, with random cross-attention.
Images are 64 px: 1 + (64 / 32)^2 = 5 image tokens.
"""

from __future__ import annotations

import torch

from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration

IMAGE_SIZE, N_IMAGE_TOKENS = 64, 5
SHARED = "model.language_model.shared.weight"
DEC = "model.language_model.decoder."


def florence_family(native, decoder_vocab_size: int | None = None, **overrides):
    """mmcap Florence-family model holding ``native``'s weights (decoder table resized when
    ``decoder_vocab_size`` differs: the native rows first, random rows after)."""
    cfg = MmcapCaptionerConfig(
        vision_config=native.config.vision_config.to_dict(),
        text_config=native.config.text_config.to_dict(),
        image_token_id=native.config.image_token_id,
        decoder_vocab_size=decoder_vocab_size,
        **overrides,
    )
    torch.manual_seed(1)
    model = MmcapCaptionerForConditionalGeneration(cfg).eval()
    sd = {k: v for k, v in native.state_dict().items() if k != SHARED}
    rows = cfg.decoder_vocab_size
    for key in (DEC + "embed_tokens.weight", "lm_head.weight"):
        table = model.state_dict()[key].clone()
        n = min(rows, sd[key].shape[0])
        table[:n] = sd[key][:n]
        sd[key] = table
    model.load_state_dict(sd, strict=True)
    return model


def gemma_family(native, gemma, image_token_id: int = 1000, xattn_std: float = 0.2):
    """mmcap Gemma-family model: ``native``'s vision + BART encoder, ``gemma``'s decoder, random
    cross-attention (std ``xattn_std``), gates 0. ``image_token_id`` 1000 lies outside the
    1000-row encoder table, as in the Gemma sizes."""
    gemma_cfg = gemma.config.to_dict()
    gemma_cfg["encoder_hidden_size"] = native.config.text_config.d_model
    cfg = MmcapCaptionerConfig(
        vision_config=native.config.vision_config.to_dict(),
        text_config=native.config.text_config.to_dict(),
        gemma_config=gemma_cfg,
        decoder_family="gemma2",
        image_token_id=image_token_id,
    )
    torch.manual_seed(2)
    model = MmcapCaptionerForConditionalGeneration(cfg).eval()
    sd = {
        k: v
        for k, v in native.state_dict().items()
        if k != SHARED and not k.startswith(DEC) and k != "lm_head.weight"
    }
    for k, v in gemma.state_dict().items():
        sd[DEC + k[len("model.") :] if k.startswith("model.") else k] = v
    own = model.state_dict()
    missing = set(own) - set(sd)
    assert all(".encoder_attn" in k or "post_encoder_attention" in k for k in missing), missing
    with torch.no_grad():
        for k in missing:
            if ".encoder_attn." in k:
                sd[k] = torch.randn_like(own[k]) * xattn_std
            elif "post_encoder_attention_layernorm" in k:
                sd[k] = torch.randn_like(own[k]) * 0.3
            else:
                sd[k] = own[k]
    model.load_state_dict(sd, strict=True)
    return model


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for layer in model.model.language_model.decoder.layers:
            layer.encoder_attn_gate.fill_(value)


def encoder_inputs(image_token_id: int, seed: int = 0, batch: int = 2, prompt_len: int = 7):
    """(pixel_values, input_ids, attention_mask): 5 image placeholders then BART-range prompt
    ids; the second sample's last 3 prompt positions are padding (BART pad 1)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    prompt = torch.randint(4, 900, (batch, prompt_len), generator=g)
    input_ids = torch.cat([torch.full((batch, N_IMAGE_TOKENS), image_token_id), prompt], dim=1)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, -3:] = 1
    attention_mask[1, -3:] = 0
    return pixel_values, input_ids, attention_mask
