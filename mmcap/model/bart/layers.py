"""Post-LN BART encoder and decoder layers (Florence-2's language model), tensor-parallel.

Encoder:  h = LN(h + drop(self_attn(h)));                         h = LN(h + drop(mlp(h)))
Decoder:  h = LN(h + drop(causal_self_attn(h))); h = LN(h + drop(cross_attn(h, enc)));
          h = LN(h + drop(mlp(h)))
as transformers' BartEncoderLayer / BartDecoderLayer (scale head_dim^-0.5, biases, exact GELU).
Under ``recompute_granularity="full"`` each layer is recomputed in backward
(:func:`mmcap.model.attention.recompute_layer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from mmcap.model.attention import AttentionSpec, CrossAttention, SelfAttention, recompute_layer
from mmcap.model.mlp import MLP
from mmcap.model.norms import layer_norm
from mmcap.parallel.rng import tp_region_rng


def bart_attention_spec(
    hidden: int, heads: int, dropout: float, init_std: float, kv_input_size: int | None = None
) -> AttentionSpec:
    """MHA with biases; every projection N(0, init_std) as HF BART initialises them."""
    init = init_method_normal(init_std)
    head_dim = hidden // heads
    return AttentionSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        softmax_scale=head_dim**-0.5,
        bias=True,
        dropout_p=dropout,
        kv_input_size=kv_input_size,
        init_method=init,
        output_init_method=init,
    )


class _PostLNLayer(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        hidden: int,
        ffn: int,
        activation: str,
        eps: float,
        dropout: float,
        activation_dropout: float,
    ) -> None:
        super().__init__(config=config)
        sp, dt = config.sequence_parallel, config.params_dtype
        self.dropout = dropout
        self.self_attn_layernorm = layer_norm(hidden, eps, sp, dt)
        self.mlp = MLP(
            config,
            hidden,
            ffn,
            activation=activation,
            gated=False,
            bias=True,
            activation_dropout=activation_dropout,
        )
        self.final_layernorm = layer_norm(hidden, eps, sp, dt)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return x
        # Replicated activations share the default RNG across TP; sequence shards fork it.
        with tp_region_rng(self.config.sequence_parallel):
            return F.dropout(x, self.dropout, training=True)


class BartEncoderLayer(_PostLNLayer):
    """Args: config (encoder TransformerConfig), hidden, heads, ffn, activation, eps, dropout,
    attention_dropout, activation_dropout, init_std."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        hidden: int,
        heads: int,
        ffn: int,
        activation: str,
        eps: float,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        init_std: float,
    ) -> None:
        super().__init__(config, hidden, ffn, activation, eps, dropout, activation_dropout)
        self.self_attention = SelfAttention(
            config, bart_attention_spec(hidden, heads, attention_dropout, init_std), causal=False
        )

    def forward(
        self,
        hidden: torch.Tensor,
        padding_mask: torch.Tensor | None,
        doc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``doc``: document ids of packed rows (then ``padding_mask`` is None)."""
        return recompute_layer(self, self._forward, hidden, padding_mask, doc)

    def _forward(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor | None, doc: torch.Tensor | None
    ) -> torch.Tensor:
        hidden = self.self_attn_layernorm(
            hidden + self._drop(self.self_attention(hidden, None, padding_mask, doc))
        )
        return self.final_layernorm(hidden + self._drop(self.mlp(hidden)))


class BartDecoderLayer(_PostLNLayer):
    """Args: as BartEncoderLayer, plus encoder_hidden (width of the encoder output)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        hidden: int,
        heads: int,
        ffn: int,
        activation: str,
        eps: float,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        init_std: float,
        encoder_hidden: int,
    ) -> None:
        super().__init__(config, hidden, ffn, activation, eps, dropout, activation_dropout)
        self.self_attention = SelfAttention(
            config, bart_attention_spec(hidden, heads, attention_dropout, init_std), causal=True
        )
        self.cross_attention = CrossAttention(
            config,
            bart_attention_spec(
                hidden, heads, attention_dropout, init_std, kv_input_size=encoder_hidden
            ),
        )
        self.cross_attn_layernorm = layer_norm(
            hidden, eps, config.sequence_parallel, config.params_dtype
        )

    def forward(
        self,
        hidden: torch.Tensor,
        ctx,
        encoder_out: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        decoder_doc: torch.Tensor | None = None,
        encoder_doc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ctx`` (the stage's shared layer context) is None for BART; ``decoder_doc`` /
        ``encoder_doc``: document ids of packed rows (or None)."""
        return recompute_layer(
            self, self._forward, hidden, encoder_out, encoder_mask, decoder_doc, encoder_doc
        )

    def _forward(
        self,
        hidden: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        decoder_doc: torch.Tensor | None,
        encoder_doc: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = self.self_attn_layernorm(
            hidden + self._drop(self.self_attention(hidden, doc=decoder_doc))
        )
        docs = None if decoder_doc is None else (decoder_doc, encoder_doc)
        hidden = self.cross_attn_layernorm(
            hidden + self._drop(self.cross_attention(hidden, encoder_out, encoder_mask, docs))
        )
        return self.final_layernorm(hidden + self._drop(self.mlp(hidden)))
