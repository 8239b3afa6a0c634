"""The configuration error type and its one validation helper (STYLE.md 3: errors name the
field and the fix)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def require(cond: bool, field_name: str, msg: str) -> None:
    """Raise ``ConfigError("<field_name>: <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


class CheckpointError(ValueError):
    """A checkpoint (mmcap or Hugging Face) is missing, damaged or does not fit the model; the
    message names the file (or tensors / config fields) and what to do."""
