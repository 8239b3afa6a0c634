"""Declarative key table between mmcap's VisionTower and the two Florence-2 checkpoint layouts.

Layouts:

- ``"hf"``: transformers 5.x native ``Florence2ForConditionalGeneration``
  (``model.vision_tower.*``, ``model.multi_modal_projector.*``);
- ``"official"``: the original remote-code layout of the microsoft/Florence-2 checkpoints and
  the paper's released models (``vision_tower.*`` with ``PreNorm``-wrapped sub-modules,
  ``image_projection`` a bare ``[c, projection_dim]`` parameter = the TRANSPOSE of an
  ``nn.Linear`` weight, ``image_proj_norm``, ``image_pos_embed``, ``visual_temporal_embed``).
  Names are those of transformers' ``convert_florence2_original_pytorch_to_hf.py``.

mmcap names are relative to :class:`~mmcap.model.vision.VisionTower`. Stage / block counts
and ``qkv_bias`` are read from the keys present, so no config is needed (a tensor missing
inside a present block is reported; a whole missing LAST block of a stage is not: the strict
``load_state_dict`` into a VisionTower built from the config catches that). Only keys in the
layout's vision namespaces are read; the rest (the language model) is ignored. Tensors are
shared, not copied, except the transposed ``image_projection``; a round trip is bit-exact.

The temporal cosine table (``visual_temporal_embed.pos_idx_to_embed``) is a non-persistent
buffer in mmcap: on import a checkpoint's copy is checked against the formula and dropped; on
export it is recomputed (float32 formula, cast to the checkpoint's dtype).
"""

from __future__ import annotations

import re
from dataclasses import fields

import torch

from mmcap.config import VisionConfig
from mmcap.model.vision.projector import cosine_temporal_table

LAYOUTS = ("hf", "official")

# Where the DaViT lives in each layout (mmcap: VisionTower.backbone).
BACKBONE_PREFIX = {"mmcap": "backbone.", "hf": "model.vision_tower.", "official": "vision_tower."}

# Per stage {i}: (mmcap, hf, official), relative to BACKBONE_PREFIX.
STAGE_KEYS = [
    ("convs.{i}.conv.{p}", "convs.{i}.conv.{p}", "convs.{i}.proj.{p}"),
    ("convs.{i}.norm.{p}", "convs.{i}.norm.{p}", "convs.{i}.norm.{p}"),
]

# Per block {i}.{j} and mixer {kind} (spatial / channel), relative to
# BACKBONE_PREFIX + "blocks.{i}.{j}.{kind}_block."; {attn} = window_attn / channel_attn.
MIXER_KEYS = [
    ("conv1.{p}", "conv1.{p}", "conv1.fn.dw.{p}"),
    ("norm1.{p}", "norm1.{p}", "{attn}.norm.{p}"),
    ("attn.qkv.{p}", "{attn}.qkv.{p}", "{attn}.fn.qkv.{p}"),
    ("attn.proj.{p}", "{attn}.proj.{p}", "{attn}.fn.proj.{p}"),
    ("conv2.{p}", "conv2.{p}", "conv2.fn.dw.{p}"),
    ("norm2.{p}", "norm2.{p}", "ffn.norm.{p}"),
    ("ffn.fc1.{p}", "ffn.fc1.{p}", "ffn.fn.net.fc1.{p}"),
    ("ffn.fc2.{p}", "ffn.fc2.{p}", "ffn.fn.net.fc2.{p}"),
]
MIXER_ATTN = {"spatial": "window_attn", "channel": "channel_attn"}

# Projector: (mmcap, hf, official, official transform).
PROJECTOR_KEYS = [
    (
        "projector.proj.weight",
        "model.multi_modal_projector.image_projection.weight",
        "image_projection",
        "transpose",
    ),
    (
        "projector.norm.weight",
        "model.multi_modal_projector.image_proj_norm.weight",
        "image_proj_norm.weight",
        None,
    ),
    (
        "projector.norm.bias",
        "model.multi_modal_projector.image_proj_norm.bias",
        "image_proj_norm.bias",
        None,
    ),
    (
        "projector.row_embed.weight",
        "model.multi_modal_projector.image_position_embed.row_embeddings.weight",
        "image_pos_embed.row_embeddings.weight",
        None,
    ),
    (
        "projector.col_embed.weight",
        "model.multi_modal_projector.image_position_embed.column_embeddings.weight",
        "image_pos_embed.column_embeddings.weight",
        None,
    ),
]
TEMPORAL_KEY = {
    "hf": "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
    "official": "visual_temporal_embed.pos_idx_to_embed",
}

# Key namespaces of the vision side: a key under one of these that the table does not know is
# an error (a key outside them belongs to the language model and is ignored).
NAMESPACES = {
    "mmcap": ("backbone.", "projector."),
    "hf": ("model.vision_tower.", "model.multi_modal_projector."),
    "official": (
        "vision_tower.",
        "image_projection",
        "image_proj_norm.",
        "image_pos_embed.",
        "visual_temporal_embed.",
    ),
}
# The original DaViT class also builds an ImageNet classifier head (``norms``, ``head``) that
# Florence-2 never runs (``forward_features_unpool``); its ports delete them. Ignored on import.
OFFICIAL_UNUSED = re.compile(r"^vision_tower\.(norms|head)\.(weight|bias)$")

_COLUMN = {"mmcap": 0, "hf": 1, "official": 2}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _structure(keys, side: str) -> tuple[list[int], bool]:
    """Blocks per stage and whether qkv has a bias, read from the keys of ``side``."""
    pre = re.escape(BACKBONE_PREFIX[side])
    stages = {int(m[1]) for k in keys if (m := re.match(pre + r"convs\.(\d+)\.", k))}
    blocks: dict[int, set[int]] = {}
    for k in keys:
        if m := re.match(pre + r"blocks\.(\d+)\.(\d+)\.", k):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    n = max(stages | set(blocks), default=-1) + 1
    if n == 0:
        raise KeyError(f"no DaViT tensors under {BACKBONE_PREFIX[side]!r} in the state dict")
    depths = [max(blocks.get(i, {-1})) + 1 for i in range(n)]
    qkv_bias = any(k.endswith("qkv.bias") for k in keys)
    return depths, qkv_bias


def key_table(depths: list[int], qkv_bias: bool) -> list[tuple[str, str, str, str | None]]:
    """All (mmcap, hf, official, official transform) names for a tower of ``depths`` blocks."""
    rows = []
    pre = BACKBONE_PREFIX
    for i, depth in enumerate(depths):
        for p in ("weight", "bias"):
            for row in STAGE_KEYS:
                names = [pre[s] + t.format(i=i, p=p) for s, t in zip(_COLUMN, row)]
                rows.append((*names, None))
        for j in range(depth):
            for kind, attn in MIXER_ATTN.items():
                for p in ("weight", "bias"):
                    for row in MIXER_KEYS:
                        if p == "bias" and row[0] == "attn.qkv.{p}" and not qkv_bias:
                            continue
                        names = [
                            f"{pre[s]}blocks.{i}.{j}.{kind}_block." + t.format(attn=attn, p=p)
                            for s, t in zip(_COLUMN, row)
                        ]
                        rows.append((*names, None))
    rows.extend(PROJECTOR_KEYS)
    return rows


def _in_namespace(key: str, side: str) -> bool:
    return any(key.startswith(ns) for ns in NAMESPACES[side])


def _convert(
    state_dict: dict[str, torch.Tensor], src: str, dst: str, skip: set[str]
) -> dict[str, torch.Tensor]:
    keys = [k for k in state_dict if _in_namespace(k, src) and k not in skip]
    depths, qkv_bias = _structure(keys, src)
    rows = key_table(depths, qkv_bias)
    missing = [r[_COLUMN[src]] for r in rows if r[_COLUMN[src]] not in state_dict]
    if missing:
        raise KeyError(f"{src} vision state dict is missing {len(missing)} tensor(s): {missing}")
    known = {r[_COLUMN[src]] for r in rows}
    unexpected = sorted(k for k in keys if k not in known)
    if unexpected:
        raise KeyError(f"{src} vision state dict has unexpected tensor(s): {unexpected}")
    out = {}
    for row in rows:
        t = state_dict[row[_COLUMN[src]]]
        if row[3] == "transpose" and "official" in (src, dst):
            t = t.t().contiguous()
        out[row[_COLUMN[dst]]] = t
    return out


def _check_temporal(key: str, table: torch.Tensor) -> None:
    """A checkpoint's temporal table must be the cosine formula (up to its dtype's rounding)."""
    ref = cosine_temporal_table(table.shape[0], table.shape[1])
    # Values lie in [-1, 1]: 2 ulps of the stored dtype at 1.0 cover fp16/bf16 storage and a
    # different libm's float32 sin/cos; 1e-5 floors it for float32 tables.
    tol = max(1e-5, 2 * torch.finfo(table.dtype).eps)
    err = (table.float().cpu() - ref).abs().max().item()
    if err > tol:
        raise ValueError(
            f"{key}: differs from the cosine formula by {err:.3g} (> {tol:.3g}); mmcap recomputes "
            "this table and cannot hold a different one"
        )


def vision_from_hf(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """mmcap VisionTower tensors from a Florence-2 state dict in ``layout`` ("hf"/"official").

    Raises KeyError naming missing tensors or unexpected ones in the vision namespaces, and
    ValueError if the checkpoint's temporal table is not the cosine formula.
    """
    _check_layout(layout)
    skip = set()
    temporal = TEMPORAL_KEY[layout]
    if temporal in state_dict:
        _check_temporal(temporal, state_dict[temporal])
        skip.add(temporal)
    if layout == "official":
        skip |= {k for k in state_dict if OFFICIAL_UNUSED.match(k)}
    return _convert(state_dict, layout, "mmcap", skip)


def vision_to_hf(
    state_dict: dict[str, torch.Tensor],
    layout: str,
    *,
    max_temporal_embeddings: int | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`vision_from_hf`: a VisionTower state dict in ``layout``.

    The temporal table is recomputed with ``max_temporal_embeddings`` rows (default: the
    VisionConfig default, 100, as in both Florence-2 configs) in the projection's dtype.
    """
    _check_layout(layout)
    out = _convert(state_dict, "mmcap", layout, set())
    if max_temporal_embeddings is None:
        max_temporal_embeddings = next(
            f.default for f in fields(VisionConfig) if f.name == "max_temporal_embeddings"
        )
    proj = state_dict["projector.proj.weight"]
    out[TEMPORAL_KEY[layout]] = cosine_temporal_table(max_temporal_embeddings, proj.shape[1]).to(
        dtype=proj.dtype, device=proj.device
    )
    return out
