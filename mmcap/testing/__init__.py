"""Test helpers: multi-process gloo runs, tiny Hugging Face reference models."""

from mmcap.testing.distributed import DistributedWorkers, run_distributed_test

__all__ = ["DistributedWorkers", "run_distributed_test"]
