"""Named model presets (STYLE.md 3): the four paper models and the tiny debug models.

Shapes come from ``shared/design/SYSTEM.md`` and the public configs of Florence-2-base/-large
(transformers' Florence2VisionConfig + BART text configs) and Gemma-2-2B/-9B.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mmcap.config.model import ConfigError, DecoderConfig, EncoderConfig, ModelConfig, VisionConfig

# Florence-2 fixes the decoder vocabulary at 256,000 Gemma tokens + 1,024 (official constant).
FLORENCE_DECODER_VOCAB = 257024
BART_VOCAB = 51289
BART_VOCAB_PADDED = 51328  # 51,289 padded to a multiple of 64 (Florence sizes, SYSTEM.md)
# Official models/florence2.py hard-codes `30 * tanh(logits / 30)` in the Florence-2 language
# model's forward, before the loss (SYSTEM.md "Decoder side, Florence-2 sizes").
FLORENCE_FINAL_LOGIT_SOFTCAP = 30.0
# BART position tables (official data/pretrained/*/config.json): 4096 positions (4,098 rows)
# for every large size's encoder and Florence-2-large's decoder; florence-2-base keeps 1024.
POSITIONS_BASE = 1024
POSITIONS_LARGE = 4096

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str):
    """Decorator: register a zero-argument function returning a ModelConfig under ``name``."""

    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        _PRESETS[name] = fn
        return fn

    return wrap


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for preset ``name``; unknown names raise ConfigError listing them."""
    if name not in _PRESETS:
        raise ConfigError(
            f"preset: unknown preset {name!r}; choose one of {', '.join(list_presets())}"
        )
    return _PRESETS[name]()


def _vision_base(**kw) -> VisionConfig:
    return VisionConfig(projection_dim=768, **kw)


def _vision_large(**kw) -> VisionConfig:
    return VisionConfig(
        embed_dim=(256, 512, 1024, 2048),
        num_heads=(8, 16, 32, 64),
        num_groups=(8, 16, 32, 64),
        projection_dim=1024,
        **kw,
    )


def _encoder_base(**kw) -> EncoderConfig:
    return EncoderConfig(
        num_layers=6,
        hidden_size=768,
        num_attention_heads=12,
        ffn_hidden_size=3072,
        max_position_embeddings=POSITIONS_BASE,
        **kw,
    )


def _encoder_large(**kw) -> EncoderConfig:
    return EncoderConfig(
        num_layers=12,
        hidden_size=1024,
        num_attention_heads=16,
        ffn_hidden_size=4096,
        max_position_embeddings=POSITIONS_LARGE,
        **kw,
    )


def _bart_decoder(layers: int, width: int, heads: int, ffn: int, positions: int) -> DecoderConfig:
    return DecoderConfig(
        arch="bart",
        num_layers=layers,
        hidden_size=width,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_kv_heads=heads,
        head_dim=width // heads,
        vocab_size=FLORENCE_DECODER_VOCAB,
        max_position_embeddings=positions,
        activation="gelu",
        norm_eps=1e-5,
        attn_logit_softcap=None,
        final_logit_softcap=FLORENCE_FINAL_LOGIT_SOFTCAP,
        sliding_window=None,
        gated_cross_attention=False,
        encoder_hidden_size=width,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        query_pre_attn_scalar=float(width // heads),
    )


def gemma2_2b_decoder(**kw) -> DecoderConfig:
    """Gemma-2-2B (public config) + gated cross-attention reading a 1024-wide encoder."""
    return DecoderConfig(
        num_layers=26,
        hidden_size=2304,
        ffn_hidden_size=9216,
        num_attention_heads=8,
        num_kv_heads=4,
        head_dim=256,
        **kw,
    )


def gemma2_9b_decoder(**kw) -> DecoderConfig:
    """Gemma-2-9B (public config) + gated cross-attention reading a 1024-wide encoder."""
    return DecoderConfig(
        num_layers=42,
        hidden_size=3584,
        ffn_hidden_size=14336,
        num_attention_heads=16,
        num_kv_heads=8,
        head_dim=256,
        **kw,
    )


@register_preset("florence-2-base")
def florence_2_base() -> ModelConfig:
    return ModelConfig(
        "florence-2-base",
        _vision_base(),
        _encoder_base(),
        _bart_decoder(6, 768, 12, 3072, POSITIONS_BASE),
    )


@register_preset("florence-2-large")
def florence_2_large() -> ModelConfig:
    return ModelConfig(
        "florence-2-large",
        _vision_large(),
        _encoder_large(),
        _bart_decoder(12, 1024, 16, 4096, POSITIONS_LARGE),
    )


@register_preset("florence-gemma-2-large")
def florence_gemma_2_large() -> ModelConfig:
    return ModelConfig(
        "florence-gemma-2-large",
        _vision_large(),
        _encoder_large(padded_vocab_size=BART_VOCAB),
        gemma2_2b_decoder(),
    )


@register_preset("florence-gemma-2-xlarge")
def florence_gemma_2_xlarge() -> ModelConfig:
    return ModelConfig(
        "florence-gemma-2-xlarge",
        _vision_large(),
        _encoder_large(padded_vocab_size=BART_VOCAB),
        gemma2_9b_decoder(),
    )


# Tiny presets: same architecture, a few layers, small widths, small vocabularies (tests build
# their own tokenizers). Four decoder layers = two sliding + two global, divisible by PP 2 and 4;
# 8 query / 4 kv heads split by TP 1, 2 and 4; heads x head_dim != hidden as in Gemma-2-2B.
def _debug_vision() -> VisionConfig:
    return VisionConfig(
        embed_dim=(16, 32, 64, 128),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        num_groups=(1, 2, 4, 8),
        window_size=3,
        projection_dim=64,
        image_size=64,
        drop_path_rate=0.1,
    )


def _debug_encoder() -> EncoderConfig:
    return EncoderConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=1000,
        padded_vocab_size=1024,
        max_position_embeddings=256,
    )


@register_preset("debug-gemma")
def debug_gemma() -> ModelConfig:
    dec = DecoderConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=8,
        num_kv_heads=4,
        head_dim=16,
        vocab_size=1000,
        max_position_embeddings=512,
        query_pre_attn_scalar=16.0,
        sliding_window=8,
        encoder_hidden_size=64,
    )
    return ModelConfig("debug-gemma", _debug_vision(), _debug_encoder(), dec)


@register_preset("debug-florence")
def debug_florence() -> ModelConfig:
    # Same BART shape on both sides (as Florence-2; one HF BartConfig describes both stacks);
    # the final logit soft-cap 30 of the Florence family comes with _bart_decoder.
    dec = dataclasses.replace(_bart_decoder(2, 64, 4, 128, 256), vocab_size=1000)
    return ModelConfig("debug-florence", _debug_vision(), _debug_encoder(), dec)
