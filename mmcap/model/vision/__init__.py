"""The frozen Florence-2 vision side: DaViT backbone + image projector = :class:`VisionTower`.

The tower is frozen in every mmcap model (SYSTEM.md "What trains"). :meth:`VisionTower.freeze`
pins it in eval mode: a later ``.train()`` (e.g. from the parent model) leaves it in eval, so
drop-path stays off and the output is deterministic; ``freeze(train_mode=True)`` instead lets it
follow the parent's mode (the official implementation's behaviour, ``ModelConfig.
vision_train_mode``: drop-path active on frozen weights). The frozen forward runs under
``torch.no_grad()`` unless ``freeze(no_grad=False)`` (for a caller that needs gradients with
respect to the pixels). Checkpoint key tables: :mod:`mmcap.model.vision.hf_keys`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmcap.config import VisionConfig
from mmcap.model.vision.davit import DaViT
from mmcap.model.vision.hf_keys import vision_from_hf, vision_to_hf
from mmcap.model.vision.projector import ImageProjector, cosine_temporal_table

__all__ = [
    "DaViT",
    "ImageProjector",
    "VisionTower",
    "cosine_temporal_table",
    "vision_from_hf",
    "vision_to_hf",
]


class VisionTower(nn.Module):
    """DaViT + ImageProjector: ``pixel_values [b, 3, H, W] -> [b, 1 + (H/32)*(W/32), proj_dim]``.

    224 px -> 50 tokens, 768 px -> 577 (``cfg.num_image_tokens``); token 0 is the spatial mean.
    Parameters live under ``backbone.`` and ``projector.`` (see ``hf_keys`` for the mapping).

    Args:
        cfg: the vision config.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.backbone = DaViT(cfg)
        self.projector = ImageProjector(cfg)
        self.frozen = False
        self.no_grad = False
        self.train_mode = False

    def freeze(self, no_grad: bool = True, train_mode: bool = False) -> VisionTower:
        """Stop gradients, switch to eval mode (for good unless ``train_mode``), and (by
        default) run under no_grad.

        Args:
            no_grad: run ``forward`` under ``torch.no_grad()`` (saves activation memory; the
                output then has no autograd history, which is right for a frozen tower whose
                input is pixels).
            train_mode: let a later ``.train()`` reach the frozen tower (drop-path active), as
                the official implementation does; False pins eval mode.
        """
        self.requires_grad_(False)
        self.frozen = True
        self.no_grad = no_grad
        self.train_mode = train_mode
        return self.train(False)

    def train(self, mode: bool = True) -> VisionTower:
        """``nn.Module.train``, except that a frozen tower stays in eval mode unless it was
        frozen with ``train_mode=True``."""
        return super().train(mode and (not self.frozen or self.train_mode))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ctx = torch.no_grad() if self.no_grad else contextlib.nullcontext()
        with ctx:
            return self.projector(self.backbone(pixel_values))
