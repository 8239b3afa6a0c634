"""Parallel engine: megatron-core process groups (and the CPU/gloo shim), TP helpers."""

from mmcap.parallel.cpu_shim import apply_cpu_shim, cuda_factories_on_cpu
from mmcap.parallel.state import (
    destroy_model_parallel,
    init_process_group,
    initialize_model_parallel,
)

__all__ = [
    "apply_cpu_shim",
    "cuda_factories_on_cpu",
    "destroy_model_parallel",
    "init_process_group",
    "initialize_model_parallel",
]
