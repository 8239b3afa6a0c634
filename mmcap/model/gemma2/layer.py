"""One Gemma-2 decoder layer with the gated cross-attention block (SYSTEM.md):

    h = h + post_attention_layernorm(self_attention(input_layernorm(h)))
    h = h + cross_attention(h, encoder_out)            # tanh(gate) * post-norm inside
    h = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

megatron-core's TransformerLayer has no slots for Gemma's post-attention / post-MLP norms
or the gated block (MEGATRON_CPU.md), so the layer is mmcap's own, built from a ModuleSpec
(:mod:`mmcap.model.specs`) whose linears and norms are megatron-core's local ones or its
Transformer Engine extension. Under ``recompute_granularity="full"`` the whole layer is recomputed
in backward (:func:`mmcap.model.attention.recompute_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.model.attention import recompute_layer
from mmcap.model.norms import LocalNorm


@dataclass
class Gemma2LayerSubmodules:
    """ModuleSpecs of one Gemma-2 layer (:func:`mmcap.model.specs.gemma2_layer_spec`);
    ``cross_attention`` None = a plain Gemma-2 layer."""

    input_layernorm: ModuleSpec | type = LocalNorm
    self_attention: ModuleSpec | type = None
    post_attention_layernorm: ModuleSpec | type = LocalNorm
    cross_attention: ModuleSpec | type | None = None
    pre_mlp_layernorm: ModuleSpec | type = LocalNorm
    mlp: ModuleSpec | type = None
    post_mlp_layernorm: ModuleSpec | type = LocalNorm


class Gemma2DecoderLayer(MegatronModule):
    """Args:
    config: the decoder's MMCapTransformerConfig.
    submodules: :class:`Gemma2LayerSubmodules`.
    layer_idx: global 0-based index of the layer (HF numbering).
    """

    def __init__(
        self, config: TransformerConfig, submodules: Gemma2LayerSubmodules, layer_idx: int
    ) -> None:
        super().__init__(config=config)
        self.layer_idx = layer_idx

        def norm(spec):
            return build_module(
                spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )

        self.input_layernorm = norm(submodules.input_layernorm)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_idx=layer_idx, causal=True
        )
        self.post_attention_layernorm = norm(submodules.post_attention_layernorm)
        self.cross_attention = (
            None
            if submodules.cross_attention is None
            else build_module(submodules.cross_attention, config=config)
        )
        self.pre_mlp_layernorm = norm(submodules.pre_mlp_layernorm)
        self.mlp = build_module(submodules.mlp, config=config)
        self.post_mlp_layernorm = norm(submodules.post_mlp_layernorm)
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
