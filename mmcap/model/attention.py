"""Tensor-parallel self- and cross-attention, shared by the Gemma-2 and BART stacks.

Projections are the tensor-parallel linears of the layer spec (:mod:`mmcap.model.specs`):
megatron-core's Column/RowParallelLinear (local) or its Transformer Engine extension. Every
shape and numeric comes from the stack's MMCapTransformerConfig
(:mod:`mmcap.model.transformer_config`), resolved per block into an :class:`AttentionSpec`.
The fused self-attention QKV uses megatron-core's grouped layout: for each of the
``num_kv_heads`` query groups the rows are [q heads of the group ; k ; v] (``head_dim`` rows
each), so a column split over TP keeps whole groups on a rank (MHA is the case groups =
heads). Cross-attention projects q from the decoder states and the fused [k ; v] (per group)
from the encoder output. The kernel is whatever the
attention back-end registry (:mod:`mmcap.ops.attention`) picks.

Sequence parallelism: q-side inputs may be sequence shards (the column-parallel linear
all-gathers them, the row-parallel output reduce-scatters). The encoder output read by
cross-attention is held in full by every TP rank, so ``linear_kv`` neither all-gathers it nor
all-reduces its gradient: the owner of the encoder output does that reduction once for all
layers (``copy_to_tensor_model_parallel_region``).

Activation recompute (megatron-core's ``recompute_granularity`` in the layer's config, set by
``build_*_transformer_config(recompute=...)``) goes through megatron-core's
``tensor_parallel.checkpoint``, which saves the CPU, CUDA and RNG-tracker states at forward
and restores them for the recompute, so dropout draws the same masks twice: "selective"
recomputes the core attention (the back-end call) here, "full" a whole layer
(:func:`recompute_layer`, called by the Gemma-2 and BART layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide, init_method_normal

from mmcap.model.rope import apply_rotary
from mmcap.model.transformer_config import with_sequence_parallel
from mmcap.ops.attention import attention
from mmcap.parallel.rng import tp_region_rng


def _recomputing(module: MegatronModule, granularity: str) -> bool:
    """Recompute only what a backward will need: in training, with grad enabled."""
    return (
        module.config.recompute_granularity == granularity
        and module.training
        and torch.is_grad_enabled()
    )


def recompute_layer(layer: MegatronModule, forward: Callable, hidden: torch.Tensor, *args):
    """``forward(hidden, *args)``, recomputed in backward under ``recompute_granularity="full"``
    (Megatron-LM's uniform method with one layer per unit) when ``layer`` trains with grad
    enabled; a plain call otherwise. ``args`` are tensors or None (checkpoint saves them).
    """
    if not _recomputing(layer, "full"):
        return forward(hidden, *args)
    tensors = [t for t in (hidden, *args) if isinstance(t, torch.Tensor)]
    if not any(t.requires_grad for t in tensors):
        if not any(p.requires_grad for p in layer.parameters()):
            return forward(hidden, *args)  # frozen layer on frozen inputs: no backward
        # A reentrant checkpoint's output needs grad only if an input does (as Megatron-LM's
        # TransformerBlock makes its input require grad).
        hidden = hidden.detach().requires_grad_()
    return tensor_parallel.checkpoint(
        forward, layer.config.distribute_saved_activations, hidden, *args
    )


@dataclass(frozen=True)
class AttentionSpec:
    """Shape and numerics of one attention block.

    Args:
        hidden_size: width of the query-side input and of the output.
        num_heads / num_kv_heads / head_dim: GQA layout (MHA: num_kv_heads == num_heads).
        softmax_scale: multiplier of q.k (Gemma-2: query_pre_attn_scalar ** -0.5).
        softcap: tanh soft-cap of the logits (Gemma-2: 50), None = off.
        window: sliding window (HF semantics) or None; self-attention only.
        bias: biases on the projections (BART: yes, Gemma-2: no).
        dropout_p: attention-probability dropout in training.
        kv_input_size: width of the encoder output (cross-attention).
        init_method / output_init_method: weight initialisers of the in / out projections.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    softmax_scale: float
    softcap: float | None = None
    window: int | None = None
    bias: bool = False
    dropout_p: float = 0.0
    kv_input_size: int | None = None
    init_method: Callable | None = None
    output_init_method: Callable | None = None

    def replace(self, **changes) -> AttentionSpec:
        return dataclasses.replace(self, **changes)


def _block_spec(config, init_std: float | None, **fields) -> AttentionSpec:
    """The fields every attention block of a stack shares (heads, scale, soft-cap, bias,
    dropout), N(0, init_std) projections (None = megatron-core's init methods), plus
    ``fields``."""
    init = None if init_std is None else init_method_normal(init_std)
    return AttentionSpec(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        softmax_scale=config.softmax_scale or config.kv_channels**-0.5,
        softcap=config.attn_logit_softcap,
        bias=config.add_bias_linear,
        dropout_p=config.attention_dropout,
        init_method=init,
        output_init_method=init,
        **fields,
    )


def self_attention_spec(config, layer_idx: int) -> AttentionSpec:
    """The self-attention block of global layer ``layer_idx`` under ``config`` (an
    MMCapTransformerConfig): Gemma-2 = scale query_pre_attn_scalar^-0.5, soft-cap, the sliding
    window on HF's ``sliding_attention`` layers; BART = head_dim^-0.5, biases."""
    return _block_spec(config, config.attention_init_std, window=config.window(layer_idx))


def cross_attention_spec(config) -> AttentionSpec:
    """Cross-attention from the stack's states to the encoder output (width
    ``config.encoder_hidden_size``): no window, the self-attention's scale and soft-cap."""
    return _block_spec(
        config, config.cross_attention_init_std, kv_input_size=config.encoder_hidden_size
    )


@dataclass
class SelfAttentionSubmodules:
    """Linear layers of :class:`SelfAttention` (column-parallel fused QKV, row-parallel out)."""

    linear_qkv: ModuleSpec | type = tensor_parallel.ColumnParallelLinear
    linear_proj: ModuleSpec | type = tensor_parallel.RowParallelLinear


@dataclass
class CrossAttentionSubmodules:
    """Linear layers of :class:`CrossAttention`. ``linear_kv`` reads the TP-replicated encoder
    output and leaves its gradient unreduced (``disable_grad_reduce``; the decoder reduces it
    once per stage), which only megatron-core's local ColumnParallelLinear offers: it stays
    local in every spec."""

    linear_q: ModuleSpec | type = tensor_parallel.ColumnParallelLinear
    linear_kv: ModuleSpec | type = tensor_parallel.ColumnParallelLinear
    linear_proj: ModuleSpec | type = tensor_parallel.RowParallelLinear


class _AttentionBase(MegatronModule):
    # Generation (:mod:`mmcap.generate.kv_cache`) attaches a per-layer cache here for the
    # duration of a decode; None = ordinary full-sequence attention.
    kv_cache = None

    def __init__(self, config: TransformerConfig, spec: AttentionSpec, linear_proj) -> None:
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = config.tensor_model_parallel_size
        self.spec = spec
        self.heads_per_rank = divide(spec.num_heads, tp)
        self.groups_per_rank = divide(spec.num_kv_heads, tp)
        self.init_method = spec.init_method or config.init_method
        self.output_init_method = spec.output_init_method or config.output_layer_init_method
        self.linear_proj = build_module(
            linear_proj,
            spec.num_heads * spec.head_dim,
            spec.hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=self.output_init_method,
            bias=spec.bias,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
        )

    def _column(self, linear, input_size: int, output_size: int, config=None, **kwargs):
        return build_module(
            linear,
            input_size,
            output_size,
            config=config or self.config,
            tp_group=self.tp_group,
            init_method=self.init_method,
            bias=self.spec.bias,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            **kwargs,
        )

    def _attend(
        self,
        q,
        k,
        v,
        *,
        causal: bool,
        window: int | None,
        kv_padding_mask: torch.Tensor | None,
        doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q [s, b, heads_local, d], k/v [s_kv, b, groups_local, d] -> projected [s, b, h].
        ``doc_ids`` (q_doc [b, s], kv_doc [b, s_kv]): packed rows, attention within documents."""
        s, b = q.shape[:2]
        dropout = self.spec.dropout_p if self.training else 0.0
        q_doc, kv_doc = doc_ids if doc_ids is not None else (None, None)

        def core_attention(q, k, v, kv_padding_mask, q_doc, kv_doc):  # bshd in and out
            with tp_region_rng(dropout > 0):
                return attention(
                    q.transpose(0, 1),
                    k.transpose(0, 1),
                    v.transpose(0, 1),
                    softmax_scale=self.spec.softmax_scale,
                    causal=causal,
                    softcap=self.spec.softcap,
                    window=window,
                    kv_padding_mask=kv_padding_mask,
                    dropout_p=dropout,
                    doc_ids=None if q_doc is None else (q_doc, kv_doc),
                )

        args = (q, k, v, kv_padding_mask, q_doc, kv_doc)
        if _recomputing(self, "selective") and (
            q.requires_grad or k.requires_grad or v.requires_grad
        ):
            # Megatron-LM's "core_attn": keep q/k/v, drop the [b, heads, s, s_kv] probabilities.
            out = tensor_parallel.checkpoint(core_attention, False, *args)
        else:
            out = core_attention(*args)
        out = out.transpose(0, 1).reshape(s, b, self.heads_per_rank * self.spec.head_dim)
        out, _ = self.linear_proj(out)
        return out


class SelfAttention(_AttentionBase):
    """Causal (decoder) or bidirectional (encoder) self-attention with fused grouped QKV.

    Args:
        config: the stack's MMCapTransformerConfig (shapes, numerics, TP size, SP, dtypes).
        submodules: the linear layers (:class:`SelfAttentionSubmodules`).
        layer_idx: global 0-based index of the layer (selects the sliding window).
        causal: decoder (True) or encoder (False) attention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_idx: int,
        causal: bool,
    ) -> None:
        spec = self_attention_spec(config, layer_idx)
        super().__init__(config, spec, submodules.linear_proj)
        self.causal = causal
        qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        self.linear_qkv = self._column(submodules.linear_qkv, spec.hidden_size, qkv)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        doc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [s(/tp with SP), b, h]; rope tables or None; padding_mask bool [b, s]
        (True = real token; encoder only); doc int [b, s] document ids of packed rows (-1 =
        padding; attention within a document, causal and window counted inside it).
        Returns [s(/tp), b, h]."""
        qkv, _ = self.linear_qkv(hidden)  # [s, b, groups_local * (hpg + 2) * d]
        s, b = qkv.shape[:2]
        d, g = self.spec.head_dim, self.groups_per_rank
        hpg = self.heads_per_rank // g
        q, k, v = torch.split(qkv.view(s, b, g, hpg + 2, d), [hpg, 1, 1], dim=3)
        q = q.reshape(s, b, self.heads_per_rank, d)
        k, v = k.reshape(s, b, g, d), v.reshape(s, b, g, d)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_cache is not None:
            # Decode step: one new query per sample attends every cached key (the cache holds
            # only the window on sliding layers), so neither a causal mask nor a window applies.
            k, v = self.kv_cache.append(k, v)
            return self._attend(q, k, v, causal=False, window=None, kv_padding_mask=None)
        return self._attend(
            q,
            k,
            v,
            causal=self.causal,
            window=self.spec.window,
            kv_padding_mask=padding_mask,
            doc_ids=None if doc is None else (doc, doc),
        )


class CrossAttention(_AttentionBase):
    """Attention from (decoder) states to a full, TP-replicated encoder output.

    Args:
        config: the stack's MMCapTransformerConfig (``encoder_hidden_size`` = k/v input width).
        submodules: the linear layers (:class:`CrossAttentionSubmodules`).
    """

    def __init__(self, config: TransformerConfig, submodules: CrossAttentionSubmodules) -> None:
        spec = cross_attention_spec(config)
        if spec.kv_input_size is None:
            raise ValueError("CrossAttention needs config.encoder_hidden_size (encoder width)")
        super().__init__(config, spec, submodules.linear_proj)
        self.linear_q = self._column(
            submodules.linear_q, spec.hidden_size, spec.num_heads * spec.head_dim
        )
        # Rows per query group: [k ; v] (megatron-core's cross-attention linear_kv layout).
        self.linear_kv = self._column(
            submodules.linear_kv,
            spec.kv_input_size,
            2 * spec.num_kv_heads * spec.head_dim,
            config=with_sequence_parallel(config, False),
            disable_grad_reduce=True,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden [s(/tp), b, h]; encoder_out [s_enc, b, w] (full on every TP rank);
        encoder_mask bool [b, s_enc], True = real token; doc_ids (decoder doc [b, s], encoder
        doc [b, s_enc]) of packed rows: decoder document i reads encoder document i only (the
        ids carry the padding, so encoder_mask is then ignored). Returns [s(/tp), b, h]."""
        q, _ = self.linear_q(hidden)
        if self.kv_cache is not None:  # generation: k/v of the encoder output computed once
            kv = self.kv_cache.cross_kv(lambda: self.linear_kv(encoder_out)[0])
        else:
            kv, _ = self.linear_kv(encoder_out)
        s, b = q.shape[:2]
        d = self.spec.head_dim
        q = q.view(s, b, self.heads_per_rank, d)
        kv = kv.view(kv.shape[0], b, self.groups_per_rank, 2, d)
        return self._attend(
            q,
            kv[:, :, :, 0],
            kv[:, :, :, 1],
            causal=False,
            window=None,
            kv_padding_mask=encoder_mask if doc_ids is None else None,
            doc_ids=doc_ids,
        )
