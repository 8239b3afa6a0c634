"""Post-LN BART encoder and decoder layers (Florence-2's language model), tensor-parallel.

Encoder:  h = LN(h + drop(self_attn(h)));                         h = LN(h + drop(mlp(h)))
Decoder:  h = LN(h + drop(causal_self_attn(h))); h = LN(h + drop(cross_attn(h, enc)));
          h = LN(h + drop(mlp(h)))
as transformers' BartEncoderLayer / BartDecoderLayer (scale head_dim^-0.5, biases, exact GELU).
Built from ModuleSpecs (:mod:`mmcap.model.specs`: local or Transformer Engine linears and
norms). Under ``recompute_granularity="full"`` each layer is recomputed in backward
(:func:`mmcap.model.attention.recompute_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.model.attention import recompute_layer
from mmcap.model.norms import LocalNorm
from mmcap.parallel.rng import tp_region_rng


@dataclass
class BartLayerSubmodules:
    """ModuleSpecs of one BART layer (:func:`mmcap.model.specs.bart_layer_spec`);
    ``cross_attention`` None = an encoder layer."""

    self_attention: ModuleSpec | type = None
    self_attn_layernorm: ModuleSpec | type = LocalNorm
    cross_attention: ModuleSpec | type | None = None
    cross_attn_layernorm: ModuleSpec | type | None = None
    mlp: ModuleSpec | type = None
    final_layernorm: ModuleSpec | type = LocalNorm


class _PostLNLayer(MegatronModule):
    """Args:
    config: the stack's MMCapTransformerConfig (widths, eps, dropouts, init).
    submodules: :class:`BartLayerSubmodules`.
    layer_idx: global 0-based index of the layer.
    causal: decoder (True) or encoder (False) self-attention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: BartLayerSubmodules,
        layer_idx: int,
        causal: bool,
    ) -> None:
        super().__init__(config=config)
        self.layer_idx = layer_idx
        self.dropout = config.hidden_dropout
        # Construction order = the order the weights draw from the initialisation RNG.
        self.self_attn_layernorm = self._norm(submodules.self_attn_layernorm)
        self.mlp = build_module(submodules.mlp, config=config)
        self.final_layernorm = self._norm(submodules.final_layernorm)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_idx=layer_idx, causal=causal
        )

    def _norm(self, spec):
        c = self.config
        return build_module(spec, config=c, hidden_size=c.hidden_size, eps=c.layernorm_epsilon)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return x
        # Replicated activations share the default RNG across TP; sequence shards fork it.
        with tp_region_rng(self.config.sequence_parallel):
            return F.dropout(x, self.dropout, training=True)


class BartEncoderLayer(_PostLNLayer):
    """Args: config (the encoder's MMCapTransformerConfig), submodules, layer_idx."""

    def __init__(
        self, config: TransformerConfig, submodules: BartLayerSubmodules, layer_idx: int
    ) -> None:
        super().__init__(config, submodules, layer_idx, causal=False)

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
    """Args: as BartEncoderLayer, with the decoder's config (``encoder_hidden_size`` = width of
    the encoder output) and the cross-attention submodules."""

    def __init__(
        self, config: TransformerConfig, submodules: BartLayerSubmodules, layer_idx: int
    ) -> None:
        super().__init__(config, submodules, layer_idx, causal=True)
        self.cross_attention = build_module(submodules.cross_attention, config=config)
        self.cross_attn_layernorm = self._norm(submodules.cross_attn_layernorm)

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
