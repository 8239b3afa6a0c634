"""Import of checkpoints of the paper's official implementation (original remote-code
Florence-2 layout, all four sizes) with no remapping: every tensor lands where it belongs, and a
tensor that lands nowhere is an error.

The Gemma sizes' decoder lives under ``language_model.model.decoder.`` with Gemma-2's names plus,
per layer, ``post_encoder_attention_layernorm`` (SYSTEM.md) and the cross-attention block, read
as ``encoder_attn.{q,k,v,o}_proj`` and ``encoder_attn_gate`` (names SYSTEM.md leaves open; the
same as mmcap's HF classes).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from mmcap.config import ModelConfig, get_preset
from mmcap.hf.convert_in import (
    OFFICIAL_DECODER_PREFIX,
    OFFICIAL_PRESET_FIELDS,
    VISION_NAMESPACES,
    Converted,
    _check_preset,
    _official_parts,
    florence_layout,
    official_arch,
)
from mmcap.hf.florence2_keys import bart_from_hf
from mmcap.hf.gemma2_keys import decoder_config_from_hf, gemma2_from_hf
from mmcap.hf.io import CheckpointError, read_config, read_state_dict
from mmcap.model.vision import vision_from_hf


class _Tracked(dict):
    """A state dict that remembers which keys were read (to find tensors that land nowhere)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def import_official(
    official_dir: str | os.PathLike, preset: str | None = None, image_size: int = 768
) -> Converted:
    """A checkpoint of the official implementation, any of the four sizes, no remapping."""
    from transformers import Gemma2Config

    cfg = read_config(official_dir)
    sd = _Tracked(read_state_dict(official_dir))
    if florence_layout(sd) != "official":
        raise CheckpointError(f"{official_dir}: not in the official (remote-code) layout")
    _, _, gemma_cfg, raw_text = _official_parts(cfg)
    # Florence sizes: logit soft-cap 30 (hard-coded in the official language model);
    # encoder pad = encoder_pad_token_id (BART <pad> 1), not the Gemma pad_token_id 0.
    arch = official_arch(cfg, image_size)
    enc_rows = sd["language_model.model.encoder.embed_tokens.weight"].shape[0]
    encoder = dataclasses.replace(arch.encoder, padded_vocab_size=enc_rows)
    if gemma_cfg:
        gemma_cfg = dict(gemma_cfg)
        enc_width = gemma_cfg.pop("encoder_hidden_size", encoder.hidden_size)
        every = gemma_cfg.pop("encoder_attn_every_x_layers", 1)
        if every != 1:
            raise CheckpointError(
                f"encoder_attn_every_x_layers={every}: mmcap inserts "
                "cross-attention in every layer (SYSTEM.md)"
            )
        decoder = decoder_config_from_hf(Gemma2Config(**gemma_cfg), encoder_hidden_size=enc_width)
    else:
        rows = sd["language_model.model.decoder.embed_tokens.weight"].shape[0]
        decoder = dataclasses.replace(
            arch.decoder, vocab_size=rows, make_vocab_size_divisible_by=128
        )
    model = ModelConfig("official", arch.vision, encoder, decoder)
    if preset:
        pre = get_preset(preset)
        _check_preset(pre, model, ("vision", "encoder", "decoder"), OFFICIAL_PRESET_FIELDS)
        model = dataclasses.replace(
            pre, vision=dataclasses.replace(pre.vision, image_size=image_size)
        )
    out = {f"vision.{k}": v for k, v in vision_from_hf(sd, "official").items()}
    if gemma_cfg:
        out.update(bart_from_hf(sd, model, "official", with_decoder=False))
        dec = gemma2_from_hf(
            sd,
            model.decoder,
            model.decoder.padded_vocab_size(1),
            prefix=OFFICIAL_DECODER_PREFIX,
            with_xattn=True,
        )
        out.update({f"decoder.{k}": v for k, v in dec.items()})
    else:
        out.update(bart_from_hf(sd, model, "official"))
    head = sd.get("language_model.lm_head.weight")
    emb = sd[OFFICIAL_DECODER_PREFIX + "embed_tokens.weight"]
    if head is not None and not torch.equal(head, emb):
        raise CheckpointError(
            "language_model.lm_head.weight differs from the decoder embedding; "
            "mmcap ties them (SYSTEM.md)"
        )
    sd.read.add("language_model.lm_head.weight")
    landed = sd.read | {k for k in sd if k.startswith(VISION_NAMESPACES["official"])}
    left = sorted(set(sd) - landed)
    if left:
        raise CheckpointError(
            f"{len(left)} tensors of {official_dir} land nowhere in mmcap: {left[:10]}"
        )
    return Converted(model, out, {"layout": "official", "raw_text_config": raw_text})
