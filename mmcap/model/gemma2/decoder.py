"""The Gemma-2 decoder with gated cross-attention (decoder of the 3.5B and 11.2B models).

Gemma-2 specifics on top of :class:`~mmcap.model.decoder_base.DecoderLanguageModel`: the
vocab-parallel embedding scaled by sqrt(hidden) (rounded to the activation dtype first, as HF),
RoPE tables shared by the stage's layers, the final RMSNorm(1 + w) and (via the config) the
final-logit soft-cap.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig
from mmcap.config import IGNORE_INDEX
from mmcap.model.decoder_base import DecoderLanguageModel
from mmcap.model.norms import LocalNorm
from mmcap.model.rope import RotaryEmbedding

__all__ = ["IGNORE_INDEX", "Gemma2Decoder"]


class Gemma2Decoder(DecoderLanguageModel):
    """Gemma-2 decoder (+ gated cross-attention) for one pipeline stage / virtual chunk.

    Args: see :class:`~mmcap.model.decoder_base.DecoderLanguageModel`.
    """

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig, **kwargs) -> None:
        if decoder.arch != "gemma2":
            raise ValueError(
                f"Gemma2Decoder needs DecoderConfig.arch='gemma2', got {decoder.arch!r}"
            )
        self.embed_scale = math.sqrt(decoder.hidden_size)
        super().__init__(config, decoder, **kwargs)
        self.rotary = RotaryEmbedding(decoder.head_dim, decoder.rope_theta)

    def build_embedding(self):
        return LanguageModelEmbedding(
            self.config,
            self.padded_vocab_size,
            self.decoder_config.max_position_embeddings,
            position_embedding_type="rope",
            tp_group=self.tp_group,
        )

    def build_final_norm(self):
        return LocalNorm(self.config, self.config.hidden_size, self.config.layernorm_epsilon)

    def embed(self, input_ids, position_ids):
        hidden = self.embedding(input_ids, position_ids=None)
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)

    def layer_context(self, position_ids):
        """RoPE cos/sin tables, computed once for all layers of the stage."""
        return self.rotary(position_ids, self.config.params_dtype)
