"""Florence-2's image projector: DaViT features -> image tokens for the BART encoder.

Numerically equal to transformers' ``Florence2MultiModalProjector`` (the original remote-code
``_encode_image`` with ``image_feature_source = ["spatial_avg_pool", "temporal_avg_pool"]``):

1. add the learned 2D position embedding: channels ``[0, c - c//2)`` = column embedding of
   the token's x, channels ``[c - c//2, c)`` = row embedding of its y;
2. add frame 0 of the 1D temporal cosine table (an image is one frame, T = 1);
3. tokens = [mean over the grid (1 pooled token) ; the h*w grid tokens (row-major)];
4. ``image_projection`` (no bias) to ``projection_dim``, then LayerNorm (eps 1e-5).

The temporal table is a NON-persistent buffer computed at construction exactly as
transformers computes it (float32, ``pos_idx_to_embed[:, 0::2] = sin``, ``[:, 1::2] = cos``),
so it never needs a checkpoint; :mod:`mmcap.model.vision.hf_keys` checks a checkpoint's copy
against it and writes it back on export. A module built on the meta device must call
:meth:`ImageProjector.reset_buffers` after ``to_empty`` (non-persistent buffers are not loaded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmcap.config import VisionConfig

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, used by transformers and the original projector
COSINE_BASE = 10000  # base of the temporal cosine embedding (transformers and original code)


def cosine_temporal_table(max_len: int, dim: int, device=None) -> torch.Tensor:
    """The ``[max_len, dim]`` float32 sinusoid table of Florence-2's temporal embedding.

    Same ops, order and dtypes as transformers' ``get_sinusoid_embeddings`` so that the table
    is bit-identical to ``Florence2VisionPositionalEmbeddingCosine1D.pos_idx_to_embed``.
    """
    if dim % 2:
        raise ValueError(f"temporal embedding width must be even, got {dim}")
    half = dim // 2
    step = math.log(COSINE_BASE) / half
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=device).float() * -step)
    angles = torch.arange(max_len, dtype=torch.float, device=device).unsqueeze(1) * freq
    table = torch.empty(max_len, dim, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class ImageProjector(nn.Module):
    """Position embeddings + pooled/grid tokens + image projection + projection LayerNorm.

    ``forward(features [b, c, h, w]) -> image tokens [b, 1 + h*w, projection_dim]``.

    Args:
        cfg: the vision config; ``c = embed_dim[-1]``, grids up to ``max_position_embeddings``
            per side, the temporal table has ``max_temporal_embeddings`` rows.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.embed_dim[-1]
        self.max_positions = cfg.max_position_embeddings
        self.max_temporal = cfg.max_temporal_embeddings
        self.row_embed = nn.Embedding(cfg.max_position_embeddings, c // 2)
        self.col_embed = nn.Embedding(cfg.max_position_embeddings, c - c // 2)
        self.proj = nn.Linear(c, cfg.projection_dim, bias=False)
        self.norm = nn.LayerNorm(cfg.projection_dim, eps=LAYER_NORM_EPS)
        self.register_buffer("temporal_embed", torch.empty(self.max_temporal, c), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the temporal cosine table in place (after ``to_empty`` from meta)."""
        buf = self.temporal_embed
        if buf.is_meta:
            return
        with torch.no_grad():
            buf.copy_(cosine_temporal_table(buf.shape[0], buf.shape[1], device=buf.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        if h > self.max_positions or w > self.max_positions:
            raise ValueError(
                f"feature grid {h}x{w} exceeds max_position_embeddings {self.max_positions}"
            )
        x = features.permute(0, 2, 3, 1)  # [b, h, w, c]; free for DaViT's channels_last output
        pos = torch.cat(
            [
                self.col_embed.weight[:w].unsqueeze(0).expand(h, w, -1),
                self.row_embed.weight[:h].unsqueeze(1).expand(h, w, -1),
            ],
            dim=-1,
        )  # [h, w, c]
        # One frame (T = 1): every token gets row 0 of the temporal table.
        x = (x + pos).reshape(b, h * w, c) + self.temporal_embed[0]
        tokens = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [b, 1 + h*w, c]
        return self.norm(self.proj(tokens))
