"""Tensor-parallel feed-forward blocks: Gemma-2's GeGLU and BART's plain two-layer MLP.

Gated (GeGLU): ``fc2(act(gate(x)) * up(x))`` with gate and up fused in ``linear_fc1``. The
full (TP-independent) fc1 weight is [gate ; up]; ``stride=2`` tells megatron-core that each TP
rank holds [gate_r ; up_r], the r-th slice of both halves (``partition_stride`` on the
parameter), so the local output splits into its halves with no communication.
Plain: ``fc2(dropout(act(fc1(x))))``. Widths, activation, gating, biases and the activation
dropout come from the stack's MMCapTransformerConfig; the two linears from the layer spec
(megatron-core's ``MLPSubmodules``: local or Transformer Engine linears).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.ops.geglu import geglu
from mmcap.parallel.rng import tp_region_rng

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_pytorch_tanh" (Gemma-2)
    "gelu": F.gelu,  # exact erf GELU (BART / Florence-2)
}


class MLP(MegatronModule):
    """Args:
    config: the stack's MMCapTransformerConfig: ``hidden_size``, ``ffn_hidden_size``,
        ``activation`` (a key of ACTIVATIONS), ``gated_linear_unit`` (GeGLU or plain),
        ``add_bias_linear``, ``activation_dropout`` (BART; training only).
    submodules: megatron-core MLPSubmodules (``linear_fc1`` column-, ``linear_fc2`` row-parallel).
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules) -> None:
        super().__init__(config=config)
        activation = config.activation
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} unknown; choose from {sorted(ACTIVATIONS)}"
            )
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.act = ACTIVATIONS[activation]
        self.activation = activation
        self.gated = gated = config.gated_linear_unit
        self.activation_dropout = config.activation_dropout
        bias = config.add_bias_linear
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            (2 if gated else 1) * config.ffn_hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.init_method,
            bias=bias,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            stride=2 if gated else 1,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            config.ffn_hidden_size,
            config.hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        if self.gated and self.activation == "gelu_tanh":
            h = geglu(h)  # [gate_r ; up_r] -> CUDA kernel when built, else geglu_ref
        elif self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.training and self.activation_dropout > 0:
            with tp_region_rng(True):  # the FFN shard differs per TP rank
                h = F.dropout(h, self.activation_dropout, training=True)
        out, _ = self.linear_fc2(h)
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The fused [gate ; up] fc1 weight is saved as its two TP-sharded halves (megatron-core's
        swiglu factory), so it reshards to any TP size."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.gated:
            key = f"{prefix}linear_fc1.weight"
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets)
        return sd
