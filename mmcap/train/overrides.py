"""Command line and YAML -> :class:`mmcap.train.config.TrainConfig` (torchtitan / Megatron-LM
style): dataclass defaults < ``--config`` YAML < ``--preset`` < ``key=value`` overrides (dotted
paths, values parsed as YAML: ``3``, ``1e-4``, ``true``, ``null``, ``[a, b]``; ``key=`` is the
empty string). Every value goes through :func:`mmcap.config.serialize.from_dict`, so errors name
the key as written."""

from __future__ import annotations

from pathlib import Path

from mmcap.config import ConfigError
from mmcap.config.serialize import from_dict
from mmcap.train.config import DataConfig, TrainConfig


def parse_override(item: str) -> tuple[list[str], object]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    # "key=" is the empty string (e.g. ``logging.tensorboard_dir=`` = off); ``key=null`` is None.
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _set(tree: dict, path: list[str], value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
    node[path[-1]] = value


def _fix_numbers(tree):
    if isinstance(tree, dict):
        return {k: _fix_numbers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_numbers(v) for v in tree]
    if isinstance(tree, str) and _looks_numeric(tree) and not tree.strip().isdigit():
        return float(tree)
    return tree


def load_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Build a :class:`TrainConfig`; see the module docstring for precedence."""
    import yaml

    tree: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: top level must be a mapping")
        tree = _fix_numbers(loaded or {})
    if preset is not None:
        tree["preset"] = preset
    for item in overrides:
        path_, value = parse_override(item)
        _set(tree, path_, value)
    if isinstance(tree.get("data"), dict):
        DataConfig.check_keys(tree["data"])
    cfg = from_dict(TrainConfig, tree)
    cfg.model_config()  # validate model overrides now
    return cfg
