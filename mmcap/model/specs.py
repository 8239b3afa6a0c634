"""ModuleSpecs of mmcap's encoder and decoder layers: one switch, two implementations.

Every layer (Gemma-2 with gated cross-attention, BART encoder / decoder) is built by
megatron-core's ``build_module`` from a ``ModuleSpec`` whose leaves are its linear and norm
classes, as Megatron-LM's ``get_gpt_layer_local_spec`` / ``..._with_transformer_engine_spec``
and Megatron-Bridge's Gemma-2 provider:

======================  ==============================  =====================================
piece                   ``local``                       ``transformer_engine``
======================  ==============================  =====================================
column-parallel linear  ColumnParallelLinear            TEColumnParallelLinear
row-parallel linear     RowParallelLinear               TERowParallelLinear
norms                   LocalNorm (GemmaRMSNorm(1 + w)  TENorm (RMSNorm with zero-centred
                        / LayerNorm)                    gamma / LayerNorm)
cross-attn ``linear_kv``  ColumnParallelLinear          ColumnParallelLinear (see below)
======================  ==============================  =====================================

The parameter names are the same in both (``weight`` / ``bias`` of every linear and norm), so
Hugging Face conversion does not depend on the implementation; the linears of both save an
``_extra_state`` (empty for megatron-core's local ones, FP8 scaling state for TE's).
Cross-attention's ``linear_kv`` stays megatron-core's local linear in both: it reads the
TP-replicated encoder output and must leave that gradient unreduced (``disable_grad_reduce``,
reduced once per decoder stage), which TE's column-parallel linear does not offer. The
attention core is mmcap's back-end registry (:mod:`mmcap.ops.attention`) in both.

The implementation is ``config.transformer_impl`` (``PrecisionConfig.transformer_impl``,
resolved by :func:`mmcap.model.te.resolve_transformer_impl`).
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mmcap.model.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from mmcap.model.bart.layers import BartDecoderLayer, BartEncoderLayer, BartLayerSubmodules
from mmcap.model.gemma2.cross_attention import GatedCrossAttention, GatedCrossAttentionSubmodules
from mmcap.model.gemma2.layer import Gemma2DecoderLayer, Gemma2LayerSubmodules
from mmcap.model.mlp import MLP
from mmcap.model.norms import LocalNorm

IMPLS = ("local", "transformer_engine")


def _pieces(impl: str) -> tuple[type, type, type]:
    """(column-parallel linear, row-parallel linear, norm) of ``impl``."""
    if impl == "local":
        return ColumnParallelLinear, RowParallelLinear, LocalNorm
    if impl == "transformer_engine":
        # Imported here: the module imports without Transformer Engine (its classes then
        # raise on construction), but there is no reason to pay for it on the local path.
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear, TENorm
    raise ValueError(f"transformer_impl {impl!r}: choose from {IMPLS}")


def _self_attention(column, row) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        submodules=SelfAttentionSubmodules(linear_qkv=column, linear_proj=row),
    )


def _mlp(column, row) -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))


def gemma2_layer_spec(impl: str = "local", *, cross_attention: bool = True) -> ModuleSpec:
    """Gemma-2 layer: sandwich RMSNorm(1 + w), GQA self-attention, GeGLU MLP and (if
    ``cross_attention``) the gated cross-attention block."""
    column, row, norm = _pieces(impl)
    xattn = None
    if cross_attention:
        xattn = ModuleSpec(
            module=GatedCrossAttention,
            submodules=GatedCrossAttentionSubmodules(
                linear_q=column, linear_kv=ColumnParallelLinear, linear_proj=row, post_norm=norm
            ),
        )
    return ModuleSpec(
        module=Gemma2DecoderLayer,
        submodules=Gemma2LayerSubmodules(
            input_layernorm=norm,
            self_attention=_self_attention(column, row),
            post_attention_layernorm=norm,
            cross_attention=xattn,
            pre_mlp_layernorm=norm,
            mlp=_mlp(column, row),
            post_mlp_layernorm=norm,
        ),
    )


def bart_layer_spec(impl: str = "local", *, decoder: bool) -> ModuleSpec:
    """Post-LN BART layer: encoder (bidirectional self-attention, MLP) or decoder (causal
    self-attention, cross-attention, MLP), LayerNorm after each block."""
    column, row, norm = _pieces(impl)
    xattn = None
    if decoder:
        xattn = ModuleSpec(
            module=CrossAttention,
            submodules=CrossAttentionSubmodules(
                linear_q=column, linear_kv=ColumnParallelLinear, linear_proj=row
            ),
        )
    return ModuleSpec(
        module=BartDecoderLayer if decoder else BartEncoderLayer,
        submodules=BartLayerSubmodules(
            self_attention=_self_attention(column, row),
            self_attn_layernorm=norm,
            cross_attention=xattn,
            cross_attn_layernorm=norm if decoder else None,
            mlp=_mlp(column, row),
            final_layernorm=norm,
        ),
    )


def layer_spec(config, *, decoder: bool = True) -> ModuleSpec:
    """The layer spec of a stack with ``config`` (an MMCapTransformerConfig): its ``arch``,
    ``transformer_impl`` and, for Gemma-2, ``gated_cross_attention``."""
    impl = config.transformer_impl
    if config.arch == "gemma2":
        return gemma2_layer_spec(impl, cross_attention=config.gated_cross_attention)
    if config.arch == "bart":
        return bart_layer_spec(impl, decoder=decoder)
    raise ValueError(f"arch {config.arch!r}: mmcap builds 'gemma2' and 'bart' layers")
