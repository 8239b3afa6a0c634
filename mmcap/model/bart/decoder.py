"""Florence-2's BART decoder with the Gemma-2 vocabulary (decoder of the 0.4B and 1.0B models).

BART specifics on top of :class:`~mmcap.model.decoder_base.DecoderLanguageModel`: token +
learned-position embeddings with ``layernorm_embedding``, post-LN layers with cross-attention,
no final norm, tied LM head without bias (transformers' Florence2ForConditionalGeneration).
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig
from mmcap.model.bart.embedding import BartEmbedding
from mmcap.model.decoder_base import DecoderLanguageModel


class FlorenceDecoder(DecoderLanguageModel):
    """Args: see :class:`~mmcap.model.decoder_base.DecoderLanguageModel`."""

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig, **kwargs) -> None:
        if decoder.arch != "bart":
            raise ValueError(
                f"FlorenceDecoder needs DecoderConfig.arch='bart', got {decoder.arch!r}"
            )
        super().__init__(config, decoder, **kwargs)

    def build_embedding(self):
        d = self.decoder_config
        return BartEmbedding(
            self.config,
            self.padded_vocab_size,
            d.hidden_size,
            d.max_position_embeddings,
            d.norm_eps,
            d.dropout,
            d.scale_embedding,
        )

    def build_final_norm(self):
        return None

    def embed(self, input_ids, position_ids):
        return self.embedding(input_ids, position_ids=position_ids)
