"""Config dataclasses <-> JSON/YAML-safe dicts: the one ``from_dict`` of every configuration
(model configs written next to checkpoints, training configs from YAML and ``key=value``).

:func:`from_dict` rebuilds nested dataclasses, rejects unknown keys, checks the basic type of
every value (``int``, ``float``, ``bool``, ``str``, lists, tuples, dicts, ``X | None``) and
re-labels the dataclasses' own validation errors with the key path the user wrote
(``data.sampler.balancing`` rather than ``SamplerConfig.balancing``), so every error names the
key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from mmcap.config.errors import ConfigError
from mmcap.config.model import ModelConfig


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """Plain dict (tuples become lists) that :func:`model_config_from_dict` inverts."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    """Rebuild (and re-validate) a ModelConfig; errors name the section and field."""
    return from_dict(ModelConfig, data, where)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if origin in (list, tuple):
        return "a list, e.g. [a, b]"
    if origin is dict:
        return "a mapping, e.g. {key: value}"
    return str(hint)


def _coerce(value, hint, where: str):
    """``value`` checked against the type hint ``hint`` (ints are accepted for floats; lists
    become tuples for tuple fields). Unknown hint kinds (Literal, classes) pass through: the
    dataclass validates them."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a section (mapping of keys), got {value!r}")
        return from_dict(hint, value, where)
    ok = True
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
        if ok:
            args = typing.get_args(hint)
            # list[X] and tuple[X, ...] check every item; fixed tuples are left to the class.
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                value = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
            value = tuple(value) if origin is tuple else list(value)
    elif origin is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{where}: must be {_describe(hint)}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Nested dict -> dataclass ``cls`` (validated by its ``__post_init__``).

    Args:
        where: the key path of ``data`` for error messages ("" = top level).
    """
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; known keys of {label}: {sorted(names)}")
    kwargs = {
        name: _coerce(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # "SamplerConfig.balancing: ..." -> "data.sampler.balancing: ..."
        msg = str(e)
        prefix = f"{cls.__name__}."
        if where and msg.startswith(prefix):
            msg = f"{where}.{msg[len(prefix):]}"
        raise ConfigError(msg) from None
    except TypeError as e:
        raise ConfigError(f"{label}: {e}") from None
