"""Typed configuration: model components, parallel layout, precision, named presets."""

from mmcap.config.constants import DEFAULT_SEED, IGNORE_INDEX

from mmcap.config.errors import ConfigError, require
from mmcap.config.model import (
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    TrainableConfig,
    VisionConfig,
    replace,
)
from mmcap.config.parallel import (
    ParallelConfig,
    PrecisionConfig,
    validate_decoder_layout,
    validate_layout,
)
from mmcap.config.presets import get_preset, list_presets, register_preset

__all__ = [
    "DEFAULT_SEED",
    "IGNORE_INDEX",
    "ConfigError",
    "DecoderConfig",
    "EncoderConfig",
    "ModelConfig",
    "TrainableConfig",
    "VisionConfig",
    "replace",
    "ParallelConfig",
    "PrecisionConfig",
    "validate_decoder_layout",
    "validate_layout",
    "get_preset",
    "list_presets",
    "register_preset",
    "require",
]
