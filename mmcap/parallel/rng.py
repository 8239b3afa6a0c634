"""RNG regions for dropout inside tensor-parallel regions."""

from __future__ import annotations

import contextlib

from megatron.core import tensor_parallel


def tp_region_rng(enabled: bool):
    """Fork megatron-core's model-parallel RNG state when ``enabled`` (dropout on the heads a
    TP rank owns must differ between TP ranks and be reproducible), else do nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return tensor_parallel.get_cuda_rng_tracker().fork()
