"""Gemma-2 decoder with gated cross-attention in every layer, from transformers' own Gemma-2 modules.

The decoder of mmcap's Gemma sizes (SYSTEM.md "Decoder side, Gemma-2 sizes"). Each layer is
transformers' :class:`Gemma2DecoderLayer` (same parameter names) plus a cross-attention block
between self-attention and the MLP::

    h = h + post_attention_layernorm(self_attn(input_layernorm(h)))
    h = h + tanh(encoder_attn_gate) * post_encoder_attention_layernorm(encoder_attn(q=h, kv=enc))
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

Cross-attention: no pre-norm on the query, GQA with the decoder's head counts, k/v projected from
``encoder_hidden_size``, scale ``query_pre_attn_scalar**-0.5``, tanh soft-cap
``attn_logit_softcapping`` on the logits, no RoPE, not causal, encoder padding mask, no biases.

Caching: self-attention k/v go through the Cache API (Gemma-2's sliding-window layers included);
cross-attention k/v are computed once per generation and kept in the cross-attention half of an
:class:`EncoderDecoderCache` (T5Gemma's scheme). That half must hold full layers, never
sliding-window ones (a window would truncate the encoder states): the decoder builds it that way,
and :meth:`MmcapGemma2XAttnDecoder.full_cross_attention_cache` repairs a cache built from the
decoder config by ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers import Gemma2Config
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2DecoderLayer,
    Gemma2PreTrainedModel,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
    Gemma2TextScaledWordEmbedding,
    eager_attention_forward,
)


class MmcapGemma2CrossAttention(nn.Module):
    """Cross-attention from decoder states to encoder states (GQA, soft-capped, no RoPE).

    Args:
        config: Gemma-2 config with ``encoder_hidden_size``.
        layer_idx: index of the layer, the key into the cross-attention cache.
    """

    def __init__(self, config: Gemma2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.attention_dropout = config.attention_dropout
        self.attn_logit_softcapping = config.attn_logit_softcapping
        self.is_causal = False
        q_dim = config.num_attention_heads * self.head_dim
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(config.encoder_hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.encoder_hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        # [B, heads, T, head_dim]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cache = past_key_values.cross_attention_cache if past_key_values is not None else None
        if past_key_values is not None and past_key_values.is_updated.get(self.layer_idx):
            key = cache.layers[self.layer_idx].keys
            value = cache.layers[self.layer_idx].values
        else:
            kv_shape = (*encoder_hidden_states.shape[:-1], -1, self.head_dim)
            key = self.k_proj(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            value = self.v_proj(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            if past_key_values is not None:
                key, value = cache.update(key, value, self.layer_idx)
                past_key_values.is_updated[self.layer_idx] = True

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=None,
            softcap=self.attn_logit_softcapping,
            **kwargs,
        )
        out = self.o_proj(out.reshape(*input_shape, -1).contiguous())
        return out, weights


class MmcapGemma2XAttnDecoderLayer(Gemma2DecoderLayer):
    """Gemma-2 decoder layer + gated cross-attention (``encoder_attn``, ``encoder_attn_gate``,
    ``post_encoder_attention_layernorm``).

    Args:
        config: Gemma-2 config with ``encoder_hidden_size``.
        layer_idx: layer index (selects sliding / full attention via ``config.layer_types``).
    """

    def __init__(self, config: Gemma2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.encoder_attn = MmcapGemma2CrossAttention(config, layer_idx)
        self.encoder_attn_gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: starts as Gemma-2
        self.post_encoder_attention_layernorm = Gemma2RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self_cache,
            **kwargs,
        )
        hidden_states = hidden_states + self.post_attention_layernorm(attn)

        xattn, _ = self.encoder_attn(
            hidden_states, encoder_hidden_states, encoder_attention_mask, past_key_values
        )
        gate = torch.tanh(self.encoder_attn_gate)
        hidden_states = hidden_states + gate * self.post_encoder_attention_layernorm(xattn)

        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class MmcapGemma2XAttnDecoder(Gemma2PreTrainedModel):
    """Gemma-2 decoder stack (Gemma2Model's names) with a cross-attention block in every layer.

    Args:
        config: Gemma-2 config with ``encoder_hidden_size``; ``vocab_size`` is the decoder
            vocabulary.
    """

    _no_split_modules: ClassVar[list[str]] = ["MmcapGemma2XAttnDecoderLayer"]

    def __init__(self, config: Gemma2Config):
        super().__init__(config)
        # Gemma-2's scaled embedding: x * sqrt(hidden), the normaliser cast to the weight dtype.
        self.embed_tokens = Gemma2TextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, config.hidden_size**0.5
        )
        self.layers = nn.ModuleList(
            MmcapGemma2XAttnDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MmcapGemma2XAttnDecoderLayer):
            init.zeros_(module.encoder_attn_gate)

    @staticmethod
    def full_cross_attention_cache(cache: EncoderDecoderCache) -> EncoderDecoderCache:
        """Give a not-yet-filled cache a cross-attention half of full (non-sliding) layers."""
        if not any(cache.is_updated.values()):
            cache.cross_attention_cache = DynamicCache()
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Decoder states for ``input_ids`` attending to ``encoder_hidden_states``.

        Args:
            input_ids: decoder ids [B, T] (or ``inputs_embeds`` [B, T, H], already scaled).
            attention_mask: decoder padding mask [B, T_past + T] (1 = keep), or None.
            encoder_hidden_states: encoder output [B, S, encoder_hidden_size].
            encoder_attention_mask: encoder padding mask [B, S] (1 = keep), or None.
            past_key_values: an :class:`EncoderDecoderCache` (self / cross halves), or None.
            use_cache: create a cache when none is given (None: ``config.use_cache``).
            position_ids: RoPE positions [B, T]; default: cache length + arange(T).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("pass exactly one of decoder input_ids or inputs_embeds")
        if encoder_hidden_states is None:
            raise ValueError("the cross-attention decoder needs encoder_hidden_states")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:  # as Gemma2Model and BartDecoder
            use_cache = self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache())
        if past_key_values is not None and not isinstance(past_key_values, EncoderDecoderCache):
            raise TypeError(
                f"past_key_values must be an EncoderDecoderCache, got {type(past_key_values).__name__}"
            )
        self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        if position_ids is None:
            past_seen = self_cache.get_seq_length() if self_cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + past_seen).unsqueeze(0)

        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": self_cache,
            "position_ids": position_ids,
        }
        self_masks = {
            "full_attention": create_causal_mask(**mask_kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
        }
        cross_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                self_masks[self.config.layer_types[i]],
                encoder_hidden_states,
                encoder_attention_mask=cross_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values,
        )


__all__ = [
    "MmcapGemma2CrossAttention",
    "MmcapGemma2XAttnDecoder",
    "MmcapGemma2XAttnDecoderLayer",
]
