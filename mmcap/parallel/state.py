"""Process groups: torch.distributed + megatron-core ``parallel_state`` for TP / PP / DP.

NCCL on GPUs, gloo on CPU (where :mod:`mmcap.parallel.cpu_shim` is applied first). Reads the
rendezvous from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the
same entry point runs single-process, multi-GPU and multi-node.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from mmcap.config.constants import DEFAULT_SEED
from mmcap.config.parallel import ParallelConfig
from mmcap.parallel.cpu_shim import apply_cpu_shim

logger = logging.getLogger(__name__)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from torchrun's env (no-op if already initialised).

    A plain ``python`` run (no RANK/WORLD_SIZE) becomes a world of one on localhost.
    """
    apply_cpu_shim()
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    init_method = None
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        # Plain `python` run: a world of one on a fresh localhost port.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_model_parallel(
    parallel: ParallelConfig, seed: int | None = DEFAULT_SEED, timeout_minutes: int = 30
) -> None:
    """Create megatron-core's TP/PP/DP groups for ``parallel`` and seed the RNG tracker.

    Args:
        parallel: the layout; DP is derived from the world size.
        seed: base seed; megatron-core derives the per-TP-rank seeds from it (None = skip).
    """
    from megatron.core import parallel_state, tensor_parallel

    init_process_group(timeout_minutes=timeout_minutes)
    parallel.resolve_data_parallel(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.virtual_pipeline_parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        distributed_timeout_minutes=timeout_minutes,
    )
    if seed is not None:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if dist.get_rank() == 0:
        logger.info(
            "parallel layout: TP=%d PP=%d DP=%d (backend %s)",
            parallel.tensor_parallel,
            parallel.pipeline_parallel,
            parallel_state.get_data_parallel_world_size(),
            dist.get_backend(),
        )


def destroy_model_parallel() -> None:
    """Tear down megatron-core's groups (the torch.distributed world stays up)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
