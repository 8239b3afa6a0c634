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

__all__ = [
    "DISABLE_ENV",
    "FUSED_ON_CPU_ENV",
    "kernels_disabled",
    "load_extension",
    "use_fused_op",
    "use_kernel",
]

DISABLE_ENV = "MMCAP_DISABLE_KERNELS"
# Run the fused ops' autograd path (the custom ops, with their torch tiles where the kernel is
# not usable) instead of the plain-autograd references: what the CUDA path saves for backward
# and computes, on CPU (the memory model's tests, end-to-end checks of the op path).
FUSED_ON_CPU_ENV = "MMCAP_FUSED_OPS_ON_CPU"
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


def use_fused_op(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` goes through its fused autograd path (custom ops): the kernel is usable,
    or ``MMCAP_FUSED_OPS_ON_CPU=1`` asks for the path with the ops' torch tiles."""
    if use_kernel(op, *tensors):
        return True
    return not kernels_disabled() and os.environ.get(FUSED_ON_CPU_ENV, "0") in ("1", "true")
