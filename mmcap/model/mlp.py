"""Tensor-parallel feed-forward blocks: Gemma-2's GeGLU and BART's plain two-layer MLP.

Gated (GeGLU): ``fc2(act(gate(x)) * up(x))`` with gate and up fused in ``linear_fc1``. The
full (TP-independent) fc1 weight is [gate ; up]; ``stride=2`` tells megatron-core that each TP
rank holds [gate_r ; up_r], the r-th slice of both halves (``partition_stride`` on the
parameter), so the local output splits into its halves with no communication.
Plain: ``fc2(dropout(act(fc1(x))))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.ops.geglu import geglu
from mmcap.parallel.rng import tp_region_rng

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_pytorch_tanh" (Gemma-2)
    "gelu": F.gelu,  # exact erf GELU (BART / Florence-2)
}


class MLP(MegatronModule):
    """Args:
    config: megatron-core TransformerConfig.
    hidden_size / ffn_hidden_size: widths.
    activation: key of ACTIVATIONS.
    gated: GeGLU (True) or plain MLP (False).
    bias: biases on both linears.
    activation_dropout: dropout after the activation (BART), training only.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        activation: str,
        gated: bool,
        bias: bool,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__(config=config)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} unknown; choose from {sorted(ACTIVATIONS)}"
            )
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.act = ACTIVATIONS[activation]
        self.activation = activation
        self.gated = gated
        self.activation_dropout = activation_dropout
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            hidden_size,
            (2 if gated else 1) * ffn_hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.init_method,
            bias=bias,
            gather_output=False,
            stride=2 if gated else 1,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            ffn_hidden_size,
            hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
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
