"""Gemma-2 self-attention on megatron-core tensor-parallel linears.

Fused QKV projection in megatron-core's grouped layout: for each of the ``num_kv_heads``
query groups, the rows are [q heads of the group ; k ; v] (each head ``head_dim`` rows), so
a ColumnParallelLinear split over TP keeps whole groups on each rank. RoPE on q and k,
scale ``query_pre_attn_scalar ** -0.5``, tanh soft-cap on the logits, causal mask, and the
sliding window on HF's ``sliding_attention`` layers; the kernel comes from the attention
back-end registry (:mod:`mmcap.ops.attention`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from mmcap.config import DecoderConfig
from mmcap.model.rope import apply_rotary
from mmcap.ops.attention import attention
from mmcap.parallel.rng import tp_region_rng


class Gemma2SelfAttention(MegatronModule):
    """Causal GQA self-attention of one Gemma-2 layer.

    Args:
        config: megatron-core TransformerConfig of the decoder (TP size, SP, dtypes, init).
        decoder: mmcap DecoderConfig (soft-cap, window, scale).
        layer_idx: global 0-based layer index (HF numbering: decides sliding vs global).
    """

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig, layer_idx: int) -> None:
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = config.tensor_model_parallel_size
        self.head_dim = decoder.head_dim
        self.heads_per_rank = divide(decoder.num_attention_heads, tp)
        self.groups_per_rank = divide(decoder.num_kv_heads, tp)
        self.softmax_scale = decoder.query_pre_attn_scalar**-0.5
        self.softcap = decoder.attn_logit_softcap
        # HF Gemma2: `sliding_window` keys including the query itself (see mmcap.ops.attention).
        self.window = decoder.sliding_window if decoder.is_sliding(layer_idx) else None
        self.dropout_p = decoder.attention_dropout
        q_size = decoder.num_attention_heads * self.head_dim
        kv_size = decoder.num_kv_heads * self.head_dim
        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            decoder.hidden_size,
            q_size + 2 * kv_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.linear_proj = tensor_parallel.RowParallelLinear(
            q_size,
            decoder.hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(
        self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """hidden [s(/tp with SP), b, h] -> [s(/tp), b, h]."""
        qkv, _ = self.linear_qkv(hidden)  # [s, b, groups_local * (hpg + 2) * d]
        s, b = qkv.shape[:2]
        hpg = self.heads_per_rank // self.groups_per_rank
        qkv = qkv.view(s, b, self.groups_per_rank, hpg + 2, self.head_dim)
        q, k, v = torch.split(qkv, [hpg, 1, 1], dim=3)
        q = q.reshape(s, b, self.heads_per_rank, self.head_dim)
        k = k.reshape(s, b, self.groups_per_rank, self.head_dim)
        v = v.reshape(s, b, self.groups_per_rank, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # [s, b, n, d] -> "bshd" for the back-ends.
        with tp_region_rng(self.training and self.dropout_p > 0):
            out = attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                softmax_scale=self.softmax_scale,
                causal=True,
                softcap=self.softcap,
                window=self.window,
                dropout_p=self.dropout_p if self.training else 0.0,
            )
        out = out.transpose(0, 1).reshape(s, b, self.heads_per_rank * self.head_dim)
        out, _ = self.linear_proj(out)
        return out
