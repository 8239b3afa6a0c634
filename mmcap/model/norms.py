"""Normalisation layers: Gemma's zero-centred RMSNorm ``x / rms(x) * (1 + weight)`` (float32
statistics) and a sequence-parallel-aware torch LayerNorm (BART).

megatron-core has no zero-centred RMSNorm without TE/apex (``WrappedTorchNorm`` asserts on
zero-centred gamma, MEGATRON_CPU.md), so mmcap owns it. With sequence parallelism the input
is a sequence shard, so the weight's gradient is partial per TP rank: the parameter carries
megatron-core's ``sequence_parallel`` attribute and is all-reduced over the TP group by
``finalize_model_grads`` (or :func:`mmcap.parallel.tp.allreduce_sequence_parallel_grads`).

:class:`LocalNorm` is the local layer spec's norm (:mod:`mmcap.model.specs`), built as
megatron-core builds its norms, ``norm(config, hidden_size, eps)``, as Transformer Engine's
``TENorm`` in the TE spec: RMSNorm(1 + w) when ``config.normalization == "RMSNorm"`` (with
``layernorm_zero_centered_gamma``), else LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcap.ops.rmsnorm import rmsnorm


class GemmaRMSNorm(nn.Module):
    """RMSNorm with (1 + weight) scaling, as transformers' Gemma2RMSNorm.

    Args:
        hidden_size: normalised width.
        eps: added to the mean square (Gemma-2: 1e-6).
        sequence_parallel: mark the weight for the TP all-reduce of its gradient.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        sequence_parallel: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        # Zero-centred gamma: 0 means identity scale.
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics and scale, cast back last (HF: "(x * w).to(dtype) differs from
        # x.to(dtype) * w" — Gemma multiplies in float32 before the cast). CUDA kernel when
        # built (csrc/rmsnorm/), else rmsnorm_ref: the same formula in plain torch.
        return rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def layer_norm(
    hidden_size: int, eps: float, sequence_parallel: bool, dtype: torch.dtype | None = None
) -> nn.LayerNorm:
    """A torch LayerNorm whose weight and bias carry megatron-core's ``sequence_parallel``
    attribute (their gradients are TP-partial when the input is a sequence shard)."""
    norm = nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
    norm.weight.sequence_parallel = sequence_parallel
    norm.bias.sequence_parallel = sequence_parallel
    return norm


class LocalNorm:
    """The norm of the local layer spec: ``LocalNorm(config, hidden_size, eps)`` returns a
    :class:`GemmaRMSNorm` (``config.normalization == "RMSNorm"``; mmcap's RMSNorm is always
    zero-centred, as Gemma's) or an SP-aware torch LayerNorm, in ``config.params_dtype``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5) -> nn.Module:
        sp, dtype = config.sequence_parallel, config.params_dtype
        if config.normalization == "RMSNorm":
            if not config.layernorm_zero_centered_gamma:
                raise ValueError(
                    "mmcap's RMSNorm is zero-centred (1 + w): set "
                    "layernorm_zero_centered_gamma=True in the TransformerConfig"
                )
            return GemmaRMSNorm(hidden_size, eps, sp, dtype)
        if config.normalization == "LayerNorm":
            return layer_norm(hidden_size, eps, sp, dtype)
        raise ValueError(f"normalization {config.normalization!r}: mmcap has RMSNorm and LayerNorm")
