"""One Gemma-2 decoder layer with the gated cross-attention block (SYSTEM.md):

    h = h + post_attention_layernorm(self_attention(input_layernorm(h)))
    h = h + cross_attention(h, encoder_out)            # tanh(gate) * post-norm inside
    h = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

megatron-core's TransformerLayer has no slots for Gemma's post-attention / post-MLP norms
or the gated block (MEGATRON_CPU.md), so the layer is mmcap's own, built from megatron-core's
tensor-parallel linears. Under ``recompute_granularity="full"`` the whole layer is recomputed
in backward (:func:`mmcap.model.attention.recompute_layer`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig
from mmcap.model.attention import AttentionSpec, SelfAttention, recompute_layer
from mmcap.model.gemma2.cross_attention import GatedCrossAttention
from mmcap.model.mlp import MLP
from mmcap.model.norms import GemmaRMSNorm


def self_attention_spec(decoder: DecoderConfig, layer_idx: int) -> AttentionSpec:
    """Gemma-2 self-attention of global layer ``layer_idx``: scale query_pre_attn_scalar^-0.5,
    soft-cap, and the sliding window on HF's ``sliding_attention`` layers."""
    return AttentionSpec(
        hidden_size=decoder.hidden_size,
        num_heads=decoder.num_attention_heads,
        num_kv_heads=decoder.num_kv_heads,
        head_dim=decoder.head_dim,
        softmax_scale=decoder.query_pre_attn_scalar**-0.5,
        softcap=decoder.attn_logit_softcap,
        window=decoder.sliding_window if decoder.is_sliding(layer_idx) else None,
        dropout_p=decoder.attention_dropout,
    )


class Gemma2DecoderLayer(MegatronModule):
    """Args:
    config: decoder TransformerConfig.
    decoder: mmcap DecoderConfig.
    layer_idx: global 0-based index of the layer (HF numbering).
    """

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig, layer_idx: int) -> None:
        super().__init__(config=config)
        self.layer_idx = layer_idx
        sp, dt, eps, h = (
            config.sequence_parallel,
            config.params_dtype,
            decoder.norm_eps,
            decoder.hidden_size,
        )
        self.input_layernorm = GemmaRMSNorm(h, eps, sp, dt)
        self.self_attention = SelfAttention(
            config, self_attention_spec(decoder, layer_idx), causal=True
        )
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, sp, dt)
        self.cross_attention = (
            GatedCrossAttention(config, decoder) if decoder.gated_cross_attention else None
        )
        self.pre_mlp_layernorm = GemmaRMSNorm(h, eps, sp, dt)
        self.mlp = MLP(
            config,
            h,
            decoder.ffn_hidden_size,
            activation=decoder.activation,
            gated=True,
            bias=False,
        )
        self.post_mlp_layernorm = GemmaRMSNorm(h, eps, sp, dt)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        encoder_out: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        decoder_doc: torch.Tensor | None = None,
        encoder_doc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``decoder_doc`` / ``encoder_doc``: document ids of packed rows (or None)."""
        if self.cross_attention is not None and encoder_out is None:
            raise ValueError(
                f"layer {self.layer_idx}: this decoder has gated cross-attention "
                "and needs encoder_out [s_enc, b, encoder_hidden]"
            )
        return recompute_layer(
            self, self._forward, hidden, *rope, encoder_out, encoder_mask, decoder_doc, encoder_doc
        )

    def _forward(
        self, hidden, cos, sin, encoder_out, encoder_mask, decoder_doc, encoder_doc
    ) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(
            self.self_attention(self.input_layernorm(hidden), (cos, sin), doc=decoder_doc)
        )
        if self.cross_attention is not None:
            docs = None if decoder_doc is None else (decoder_doc, encoder_doc)
            hidden = hidden + self.cross_attention(hidden, encoder_out, encoder_mask, docs)
        hidden = hidden + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(hidden)))
        return hidden
