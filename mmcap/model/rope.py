"""Rotary position embedding (RoPE), "rotate-half" layout as Gemma / Hugging Face Llama.

Inverse frequencies and angles are computed in float32 and the cos/sin tables cast to the
activation dtype, as transformers' Gemma2RotaryEmbedding does, so logits match it exactly in
float32 and round the same way in bf16.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for positions; applied by :func:`apply_rotary`.

    Args:
        head_dim: rotated width (all of the head, as Gemma-2).
        theta: RoPE base (Gemma-2: 10,000).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [s, b, 1, head_dim] for position_ids [b, s]."""
        device = position_ids.device
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        emb = emb.transpose(0, 1).unsqueeze(2)  # [s, b, 1, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [s, b, heads, head_dim] by the tables from :class:`RotaryEmbedding`."""
    return x * cos + _rotate_half(x) * sin
