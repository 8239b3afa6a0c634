"""Tiny random Hugging Face reference models built locally (no hub), for parity tests."""

from __future__ import annotations

import torch


def tiny_gemma2(
    seed: int = 0,
    *,
    num_layers: int = 4,
    vocab_size: int = 1000,
    sliding_window: int = 4,
    attn_softcap: float = 20.0,
    final_softcap: float = 15.0,
    query_pre_attn_scalar: int = 24,
    num_heads: int = 8,
    num_kv_heads: int = 4,
):
    """A random ``Gemma2ForCausalLM`` in float32 with eager attention.

    Defaults differ from Gemma-2's on purpose (soft-caps 20 / 15, scalar 24 != head_dim, a
    window smaller than test sequences, vocab not a multiple of 128) so that a converter or
    layer that hard-codes a Gemma default fails the parity test. Norm weights are random
    (HF initialises them to 0, which would hide a missing ``1 +``).
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        query_pre_attn_scalar=query_pre_attn_scalar,
        sliding_window=sliding_window,
        attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def tiny_florence2(seed: int = 0, *, vocab_size: int = 1000, image_token_id: int = 999):
    """A random transformers ``Florence2ForConditionalGeneration`` (float32, eval): DaViT with
    four tiny stages, a 2+2-layer BART with d_model 64. LayerNorm affines are randomised (HF
    initialises them to 1 / 0, which would hide a missing or swapped norm)."""
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    vision = Florence2VisionConfig(
        embed_dim=(16, 32, 64, 128),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        num_groups=(1, 2, 4, 8),
        window_size=3,
        projection_dim=64,
    )
    text = BartConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=vocab_size,
        max_position_embeddings=128,
    )
    cfg = Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model
