"""ModelConfig <-> JSON-safe dict (written next to every checkpoint and exported model)."""

from __future__ import annotations

import dataclasses
import typing

from mmcap.config.model import (
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    TrainableConfig,
    VisionConfig,
)

_SECTIONS = {
    "vision": VisionConfig,
    "encoder": EncoderConfig,
    "decoder": DecoderConfig,
    "trainable": TrainableConfig,
}


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """Plain dict (tuples become lists) that :func:`model_config_from_dict` inverts."""
    return dataclasses.asdict(cfg)


def _section(cls, data: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list) and "tuple" in str(hints[name]):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    """Rebuild (and re-validate) a ModelConfig; errors name the section and field."""
    unknown = sorted(set(data) - {"name", "vision_train_mode", *_SECTIONS})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for ModelConfig")
    kwargs = {"name": data.get("name", "custom")}
    if "vision_train_mode" in data:  # absent in checkpoints written before the switch
        kwargs["vision_train_mode"] = data["vision_train_mode"]
    for key, cls in _SECTIONS.items():
        if key in data:
            kwargs[key] = _section(cls, data[key], f"{where}.{key}")
    return ModelConfig(**kwargs)
