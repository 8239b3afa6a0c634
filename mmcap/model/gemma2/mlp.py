"""Gemma-2 GeGLU MLP: ``fc2(gelu_tanh(gate(x)) * up(x))`` on megatron-core TP linears.

``linear_fc1`` fuses gate and up in one GEMM. Its full (TP-independent) weight is
[gate ; up]; ``stride=2`` tells megatron-core that each TP rank holds [gate_r ; up_r], the
r-th slice of both halves (``partition_stride`` on the parameter), so the local output splits
into its gate and up halves with no communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mmcap.config import DecoderConfig


class GeGLUMLP(MegatronModule):
    """Gated MLP with tanh-approximate GELU (HF ``gelu_pytorch_tanh``)."""

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig) -> None:
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            decoder.hidden_size,
            2 * decoder.ffn_hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            stride=2,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            decoder.ffn_hidden_size,
            decoder.hidden_size,
            config=config,
            tp_group=self.tp_group,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        gate, up = h.chunk(2, dim=-1)
        out, _ = self.linear_fc2(F.gelu(gate, approximate="tanh") * up)
        return out
