"""Gated cross-attention block inserted in every Gemma-2 layer (SYSTEM.md):

    h = h + tanh(gate) * post_xattn_norm(XAttn(q=h, kv=encoder_out))

No pre-norm on the query, GQA with the decoder's head counts, k/v projected from the encoder
width, scale ``query_pre_attn_scalar ** -0.5``, tanh soft-cap, no RoPE, no bias, not causal,
encoder padding mask. ``gate`` is one scalar initialised to 0 (the model starts as plain
Gemma-2); q/k/v/o are N(0, 0.02). TP / SP handling: :class:`mmcap.model.attention.CrossAttention`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal
from torch import nn

from mmcap.config import DecoderConfig
from mmcap.model.attention import AttentionSpec, CrossAttention
from mmcap.model.norms import GemmaRMSNorm


def gated_xattn_spec(decoder: DecoderConfig) -> AttentionSpec:
    init = init_method_normal(decoder.xattn_init_std)
    return AttentionSpec(
        hidden_size=decoder.hidden_size,
        num_heads=decoder.num_attention_heads,
        num_kv_heads=decoder.num_kv_heads,
        head_dim=decoder.head_dim,
        softmax_scale=decoder.query_pre_attn_scalar**-0.5,
        softcap=decoder.attn_logit_softcap,
        dropout_p=decoder.attention_dropout,
        kv_input_size=decoder.encoder_hidden_size,
        init_method=init,
        output_init_method=init,
    )


class GatedCrossAttention(CrossAttention):
    """Cross-attention to the encoder output, post-normed and gated by tanh(gate).

    Args:
        config: decoder TransformerConfig.
        decoder: mmcap DecoderConfig (heads, head_dim, encoder width, soft-cap, init std).
    """

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig) -> None:
        super().__init__(config, gated_xattn_spec(decoder))
        self.post_norm = GemmaRMSNorm(
            decoder.hidden_size,
            decoder.norm_eps,
            sequence_parallel=config.sequence_parallel,
            dtype=config.params_dtype,
        )
        self.gate = nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        # With SP the gate multiplies a sequence shard: its gradient is partial per TP rank.
        self.gate.sequence_parallel = config.sequence_parallel

    def forward(
        self,
        hidden: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Residual update for ``hidden`` [s(/tp), b, h] (see CrossAttention.forward)."""
        out = super().forward(hidden, encoder_out, encoder_mask, doc_ids)
        return torch.tanh(self.gate) * self.post_norm(out)
