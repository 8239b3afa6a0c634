"""Processes die with their launcher: a parent-death signal (Linux ``prctl``).

torchrun starts every rank in a session of its own (``start_new_session=True``), so a
``kill -KILL`` of torchrun's process group does not reach the ranks: they would go on running
(and writing the run's checkpoint directory) after the launcher is gone. Each rank, and each of
its DataLoader workers, asks the kernel for SIGKILL when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask for ``sig`` when the parent process dies; exits at once if it already has (the
    process was re-parented before the call). Returns False where unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)  # the parent is already gone
    return True


def forkserver_dies_with_parent() -> None:
    """Make this process's multiprocessing fork server (which DataLoader workers are forked
    from) ask for SIGKILL when its parent dies: otherwise a SIGKILLed rank leaves the fork
    server, and with it the workers and the resource tracker, running. Call before the first
    forkserver process starts; later calls do nothing to a running server."""
    import multiprocessing as mp

    mp.get_context("forkserver").set_forkserver_preload(
        ["__main__", "mmcap.parallel._lifetime_preload"]
    )


def checkpoint_writer_dies_with_parent() -> None:
    """Make megatron-core's checkpoint writer server die with the rank that started it.

    megatron-core's distributed-checkpoint writer (``dist_checkpointing.strategies.
    filesystem_async``, the default ``torch_dist`` save) starts a multiprocessing ``Manager``
    server ("spawn") on each writing rank at the rank's first save, to carry the write results.
    A rank that exits normally shuts it down; a rank killed with SIGKILL (kill -9, the OOM
    killer, a preempted node's launcher) leaves it running for good, ~0.3 GB each. This starts
    that server itself, with :func:`die_with_parent` as its initializer, where megatron-core
    would start it; call before saving (idempotent; nothing to do once megatron-core has made
    its own). PR_SET_PDEATHSIG follows the creating thread: save from the main thread, as
    mmcap does."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa._get_write_results_queue, "_mmcap_dies_with_parent", False):
        return
    if fa._results_queue is not None:  # megatron-core's own server exists already
        return

    def get_write_results_queue():
        if fa._results_queue is None:
            import multiprocessing as mp
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=die_with_parent)
            fa._results_queue = manager.Queue()  # the proxy keeps the manager alive
        return fa._results_queue

    get_write_results_queue._mmcap_dies_with_parent = True
    fa._get_write_results_queue = get_write_results_queue
