"""Fusing separate q / k / v projections into megatron-core's grouped layouts and back.

Self-attention ``linear_qkv``: for each kv group g, rows [q heads of g ; k_g ; v_g]; cross-
attention ``linear_kv``: per group [k_g ; v_g]. Both layouts are TP-independent: a column
split over TP keeps whole groups on each rank. Works for weights [rows, in] and biases [rows].
"""

from __future__ import annotations

import torch


def _rows(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """View rows as ``shape`` (+ the input width for a weight)."""
    return t.reshape(*shape, *t.shape[1:])


def _flat(t: torch.Tensor, width: tuple[int, ...]) -> torch.Tensor:
    return t.reshape(-1, *width)


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv: int, head_dim: int
) -> torch.Tensor:
    """[q; k; v] projection rows -> megatron-core grouped layout [(q_g, k_g, v_g) for g]."""
    hpg = num_heads // num_kv
    parts = [
        _rows(q, num_kv, hpg, head_dim),
        _rows(k, num_kv, 1, head_dim),
        _rows(v, num_kv, 1, head_dim),
    ]
    return _flat(torch.cat(parts, dim=1), tuple(q.shape[1:]))


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    hpg = num_heads // num_kv
    width = tuple(qkv.shape[1:])
    q, k, v = _rows(qkv, num_kv, hpg + 2, head_dim).split([hpg, 1, 1], dim=1)
    return _flat(q, width).clone(), _flat(k, width).clone(), _flat(v, width).clone()


def fuse_kv(k: torch.Tensor, v: torch.Tensor, num_kv: int, head_dim: int) -> torch.Tensor:
    """[k; v] rows -> grouped [(k_g, v_g) for g] (cross-attention ``linear_kv``)."""
    return _flat(
        torch.stack([_rows(k, num_kv, head_dim), _rows(v, num_kv, head_dim)], dim=1),
        tuple(k.shape[1:]),
    )


def split_kv(kv: torch.Tensor, num_kv: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_kv`."""
    width = tuple(kv.shape[1:])
    g = _rows(kv, num_kv, 2, head_dim)
    return _flat(g[:, 0], width).clone(), _flat(g[:, 1], width).clone()
