"""Which path a fused op takes: its CUDA extension (``csrc/<op>/``) or its plain-torch reference.

The kernel path needs all of: CUDA tensors, the extension ``mmcap_<op>_cuda`` built (setup.py
builds one per ``csrc/<op>/`` folder when a CUDA toolkit is present) and
``MMCAP_DISABLE_KERNELS`` unset or ``0``. Anything else (CPU, no build, the switch) takes the
reference, so CPU runs always use the ``*_ref`` functions (STYLE.md rule 5).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

__all__ = ["DISABLE_ENV", "kernels_disabled", "load_extension", "use_kernel"]

DISABLE_ENV = "MMCAP_DISABLE_KERNELS"
logger = logging.getLogger("mmcap.ops")


def kernels_disabled() -> bool:
    """True when ``MMCAP_DISABLE_KERNELS`` forces the reference path (read at every call)."""
    value = os.environ.get(DISABLE_ENV, "0").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{DISABLE_ENV}={value!r}: use 1 (reference path) or 0 (kernels)")
    return value in ("1", "true")


@functools.cache
def load_extension(op: str) -> ModuleType | None:
    """The compiled ``mmcap_<op>_cuda`` module, or None when it was not built."""
    try:
        return importlib.import_module(f"mmcap_{op}_cuda")
    except ImportError as e:
        if torch.cuda.is_available():
            logger.info("mmcap_%s_cuda not built (%s): %s uses its reference", op, e, op)
        return None


def use_kernel(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` should run its CUDA kernel on these tensors."""
    if kernels_disabled() or not all(t.is_cuda for t in tensors):
        return False
    return load_extension(op) is not None
