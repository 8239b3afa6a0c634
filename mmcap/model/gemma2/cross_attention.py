"""Gated cross-attention block inserted in every Gemma-2 layer (SYSTEM.md):

    h = h + tanh(gate) * post_xattn_norm(XAttn(q=h, kv=encoder_out))

No pre-norm on the query, GQA with the decoder's head counts, k/v projected from the encoder
width, scale ``query_pre_attn_scalar ** -0.5``, tanh soft-cap, no RoPE, no bias, not causal,
encoder padding mask. ``gate`` is one scalar initialised to 0 (the model starts as plain
Gemma-2); q/k/v/o are N(0, 0.02).

Tensor parallelism: ``linear_q`` / ``linear_proj`` follow the decoder's TP (and sequence
parallel) layout; ``linear_kv`` reads the encoder output, which every TP rank holds in full,
so it never all-gathers along the sequence and leaves the TP all-reduce of the encoder-output
gradient to the decoder, which does it ONCE for all layers
(``copy_to_tensor_model_parallel_region`` in :class:`~mmcap.model.gemma2.decoder.Gemma2Decoder`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide, init_method_normal
from torch import nn

from mmcap.config import DecoderConfig
from mmcap.model.norms import GemmaRMSNorm
from mmcap.model.transformer_config import with_sequence_parallel
from mmcap.ops.attention import attention
from mmcap.parallel.rng import tp_region_rng


class GatedCrossAttention(MegatronModule):
    """Cross-attention from decoder states to the encoder output, gated by tanh(gate).

    Args:
        config: decoder TransformerConfig.
        decoder: mmcap DecoderConfig (heads, head_dim, encoder width, soft-cap, init std).
    """

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig) -> None:
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = config.tensor_model_parallel_size
        self.head_dim = decoder.head_dim
        self.heads_per_rank = divide(decoder.num_attention_heads, tp)
        self.groups_per_rank = divide(decoder.num_kv_heads, tp)
        self.softmax_scale = decoder.query_pre_attn_scalar**-0.5
        self.softcap = decoder.attn_logit_softcap
        self.dropout_p = decoder.attention_dropout
        init = init_method_normal(decoder.xattn_init_std)
        q_size = decoder.num_attention_heads * self.head_dim
        kv_size = decoder.num_kv_heads * self.head_dim
        self.linear_q = tensor_parallel.ColumnParallelLinear(
            decoder.hidden_size,
            q_size,
            config=config,
            tp_group=self.tp_group,
            init_method=init,
            bias=False,
            gather_output=False,
        )
        # Rows per query group: [k ; v] (megatron-core's cross-attention linear_kv layout).
        self.linear_kv = tensor_parallel.ColumnParallelLinear(
            decoder.encoder_hidden_size,
            2 * kv_size,
            config=with_sequence_parallel(config, False),
            tp_group=self.tp_group,
            init_method=init,
            bias=False,
            gather_output=False,
            disable_grad_reduce=True,
        )
        self.linear_proj = tensor_parallel.RowParallelLinear(
            q_size,
            decoder.hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
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
        self, hidden: torch.Tensor, encoder_out: torch.Tensor, encoder_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Residual update for ``hidden`` [s(/tp), b, h].

        Args:
            encoder_out: [s_enc, b, encoder_hidden], full sequence on every TP rank.
            encoder_mask: bool [b, s_enc], True for real encoder tokens (None = no padding).
        """
        q, _ = self.linear_q(hidden)  # [s, b, heads_local * d]
        kv, _ = self.linear_kv(encoder_out)  # [s_enc, b, groups_local * 2 * d]
        s, b = q.shape[:2]
        se = kv.shape[0]
        q = q.view(s, b, self.heads_per_rank, self.head_dim)
        kv = kv.view(se, b, self.groups_per_rank, 2, self.head_dim)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        with tp_region_rng(self.training and self.dropout_p > 0):
            out = attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                softmax_scale=self.softmax_scale,
                causal=False,
                softcap=self.softcap,
                kv_padding_mask=encoder_mask,
                dropout_p=self.dropout_p if self.training else 0.0,
            )
        out = out.transpose(0, 1).reshape(s, b, self.heads_per_rank * self.head_dim)
        out, _ = self.linear_proj(out)
        return torch.tanh(self.gate) * self.post_norm(out)
