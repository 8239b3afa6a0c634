"""Florence-2's BART decoder with the Gemma-2 vocabulary (decoder of the 0.4B and 1.0B models).

BART specifics on top of :class:`~mmcap.model.decoder_base.DecoderLanguageModel`: token +
learned-position embeddings with ``layernorm_embedding``, post-LN layers with cross-attention,
no final norm, tied LM head without bias (transformers' Florence2ForConditionalGeneration).
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig
from mmcap.model.bart.embedding import BartEmbedding
from mmcap.model.bart.layers import BartDecoderLayer
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

    def build_layer(self, layer_idx: int):
        d = self.decoder_config
        return BartDecoderLayer(
            self.config,
            hidden=d.hidden_size,
            heads=d.num_attention_heads,
            ffn=d.ffn_hidden_size,
            activation=d.activation,
            eps=d.norm_eps,
            dropout=d.dropout,
            attention_dropout=d.attention_dropout,
            activation_dropout=d.activation_dropout,
            init_std=d.init_std,
            encoder_hidden=d.encoder_hidden_size,
        )

    def build_final_norm(self):
        return None

    def embed(self, input_ids, position_ids):
        return self.embedding(input_ids, position_ids=position_ids)
