"""Gated cross-attention block inserted in every Gemma-2 layer (SYSTEM.md):

    h = h + tanh(gate) * post_xattn_norm(XAttn(q=h, kv=encoder_out))

No pre-norm on the query, GQA with the decoder's head counts, k/v projected from the encoder
width, scale ``query_pre_attn_scalar ** -0.5``, tanh soft-cap, no RoPE, no bias, not causal,
encoder padding mask. ``gate`` is one scalar initialised to 0 (the model starts as plain
Gemma-2); q/k/v/o are N(0, xattn_init_std) (``config.cross_attention_init_std``). TP / SP
handling: :class:`mmcap.model.attention.CrossAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mmcap.model.attention import CrossAttention, CrossAttentionSubmodules
from mmcap.model.norms import LocalNorm


@dataclass
class GatedCrossAttentionSubmodules(CrossAttentionSubmodules):
    """The cross-attention's linears plus its post-norm."""

    post_norm: ModuleSpec | type = LocalNorm


class GatedCrossAttention(CrossAttention):
    """Cross-attention to the encoder output, post-normed and gated by tanh(gate).

    Args:
        config: the decoder's MMCapTransformerConfig.
        submodules: :class:`GatedCrossAttentionSubmodules`.
    """

    def __init__(
        self, config: TransformerConfig, submodules: GatedCrossAttentionSubmodules
    ) -> None:
        super().__init__(config, submodules)
        self.post_norm = build_module(
            submodules.post_norm,
            config=config,
            hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
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
