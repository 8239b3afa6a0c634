"""Checkpoints: megatron-core distributed checkpoints of mmcap models."""

from mmcap.checkpoint.dist import (
    CONFIG_FILE,
    load_model_checkpoint,
    read_checkpoint_info,
    resolve_checkpoint_dir,
    save_model_checkpoint,
)

__all__ = [
    "CONFIG_FILE",
    "load_model_checkpoint",
    "read_checkpoint_info",
    "resolve_checkpoint_dir",
    "save_model_checkpoint",
]
