"""CPU/gloo shim for megatron-core: the one place mmcap patches megatron-core's CUDA assumptions.

megatron-core 0.16.1 assumes a GPU in a handful of call sites that are otherwise
device-agnostic (measured in ``shared/design/MEGATRON_CPU.md``). On a machine without CUDA,
:func:`apply_cpu_shim` redirects exactly those calls to the CPU so the real megatron-core
code paths (tensor-parallel layers, sequence parallel, RNG tracker, pipeline schedules,
distributed optimizer, dist checkpointing) run on gloo for tests and CPU smoke runs.

It is a no-op when CUDA is available: a GPU run never sees any of these patches.
Each patch names the megatron-core call site it serves.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False

# Factory functions megatron-core calls with ``device="cuda"`` (schedules:
# ``torch.zeros(..., device="cuda")``; clip_grads / utils: ``torch.tensor(..., device="cuda")``).
_FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.tensor,
    torch.arange,
    torch.empty_like,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.rand,
    torch.randn,
    torch.as_tensor,
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects ``device="cuda"`` in factory calls and ``Tensor.to("cuda")`` to the CPU.

    Serves: ``pipeline_parallel/schedules.py`` (``torch.zeros(1, device="cuda")`` for the
    loss accumulator), ``p2p_communication.py`` (receive buffers), ``clip_grads.py`` and
    ``utils.py`` (``torch.tensor([...], device="cuda")`` for norms).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        elif func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        elif func is torch.Tensor.to and _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _DummyStream:
    """Stands in for ``torch.cuda.current_stream()`` (p2p_communication, distributed DDP)."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return None


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def apply_cpu_shim() -> bool:
    """Patch megatron-core's CUDA-only call sites to run on CPU, once per process.

    Returns:
        True when the shim is active (no CUDA), False on a GPU machine (nothing patched).
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # tensor_parallel/layers.py, mappings.py, utils.GlobalMemoryBuffer (sequence-parallel
    # all-gather buffers): ``torch.empty(..., device=torch.cuda.current_device())``.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # dist_checkpointing, p2p_communication, parallel_state barrier helpers.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()  # type: ignore[assignment]
    # LanguageModule.setup_embeddings_and_output_layer: ``weight.data.cuda()`` before the
    # embedding all-reduce between first and last pipeline stage.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    # tensor_parallel/random.py: the RNG tracker (model_parallel_cuda_manual_seed, fork())
    # stores and swaps CUDA generator states; point it at the CPU default generator.
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # fork() warns when the CPU generator changes inside a "CUDA" RNG region; here the CPU
    # generator IS the tracked one, so that is the expected behaviour, not a bug.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    # Tensor.type() is compared against "torch.cuda.FloatTensor" / HalfTensor / BFloat16Tensor
    # in optimizer/distrib_optimizer.py and optimizer/clip_grads.py.
    # Keep the true original even if another copy of this module patched it already.
    _orig_type = getattr(torch.Tensor.type, "_mmcap_original", torch.Tensor.type)

    def _cuda_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None:
            return _orig_type(self, dtype, non_blocking, **kwargs)
        name = _orig_type(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    _cuda_type._mmcap_original = _orig_type
    torch.Tensor.type = _cuda_type  # type: ignore[assignment]

    _APPLIED = True
    logger.info("megatron-core CPU shim applied (no CUDA): running on gloo/CPU")
    return True


@contextlib.contextmanager
def cuda_factories_on_cpu():
    """Redirect ``device="cuda"`` factory calls to the CPU inside this context (no-op with CUDA).

    Kept out of the global shim because a process-wide TorchFunctionMode would also sit under
    ``torch.compile`` (FlexAttention); callers wrap only megatron-core's schedule, optimizer and
    gradient-clipping calls with it.
    """
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpuMode():
        yield
