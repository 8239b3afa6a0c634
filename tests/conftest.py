"""Shared pytest setup: CPU-friendly threads, the megatron-core CPU shim, GPU skipping."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _cpu_shim():
    from mmcap.parallel import apply_cpu_shim

    apply_cpu_shim()


@pytest.fixture(scope="module")
def single_rank_parallel_state():
    """A world of one with megatron-core groups TP=PP=1, for single-process model tests."""
    import torch.distributed as dist

    from mmcap.config import ParallelConfig
    from mmcap.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield
    destroy_model_parallel()
    dist.destroy_process_group()  # later modules may fork worker pools from a clean process
