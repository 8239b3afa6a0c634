"""Run test functions in N gloo processes (OLMo-core's ``run_distributed_test``, pooled).

Starting processes and a torch.distributed world costs seconds per test on a 2-core machine,
so :class:`DistributedWorkers` starts the world ONCE (e.g. per test module, via a pytest
fixture) and then runs any number of functions in it; :func:`run_distributed_test` is the
one-shot form. Each function runs on every rank as ``fn(*args)`` and its return value (any
picklable object) comes back as a list indexed by rank; an exception on any rank is re-raised
in the parent with every failing rank's traceback.

Functions must be importable module-level callables (they are pickled by reference). Workers
start from a "forkserver": a clean process that imports torch, megatron-core and mmcap once
and forks every worker from there. Forking the test process itself is unsafe (it may hold
locks of inductor's compile threads or OpenMP pools, or its own torch.distributed group) and
plain "spawn" would re-import torch and megatron-core in every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

_STOP = "__stop__"
# Imported once by the fork server, inherited by every worker it forks.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.tensor_parallel",
    "megatron.core.parallel_state",
    "mmcap.testing.distributed",
    "mmcap.parallel",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, threads: int) -> None:
    import torch
    import torch.distributed as dist

    from mmcap.parallel.cpu_shim import apply_cpu_shim

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    apply_cpu_shim()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    except Exception:  # report the failure instead of hanging the parent
        results.put((rank, False, traceback.format_exc()))
        return
    parent = os.getppid()
    while True:
        try:
            item = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the test process died: do not linger
                break
            continue
        if item == _STOP:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - sent back to the parent verbatim
            results.put((rank, False, traceback.format_exc()))
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception as e:  # shutting down anyway: report, do not mask the exit
        print(f"rank {rank}: destroy_model_parallel failed at shutdown: {e}", file=sys.stderr)
    dist.destroy_process_group()


class DistributedWorkers:
    """A pool of ``world_size`` processes sharing one gloo world.

    Args:
        world_size: number of ranks.
        timeout: seconds to wait for every rank's result of one call.
        threads: torch intra-op threads per rank (1 keeps 2-4 ranks on 2 cores honest).
        start_method: multiprocessing start method ("forkserver" default, or "spawn").
    """

    def __init__(
        self,
        world_size: int,
        timeout: float = 300.0,
        threads: int = 1,
        start_method: str = "forkserver",
    ) -> None:
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, self._tasks[r], self._results, threads),
                # Not daemonic: megatron-core's checkpoint writer forks helpers, which daemonic
                # processes may not; orphaned workers exit on their own (see _worker).
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + self.timeout
        while len(out) + len(errors) < self.world_size:
            try:
                # Short polls: a rank that died (crash, os._exit) is reported at once.
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if not dead and time.monotonic() < deadline:
                    continue
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(out) - set(errors))
                seen = "\n".join(
                    f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(errors.items())
                )
                what = f"ranks {dead} died" if dead else f"no result within {self.timeout:.0f} s"
                raise TimeoutError(
                    f"{fn.__name__}: {what}; missing results from ranks {missing} (a collective "
                    f"left waiting by a rank that failed is the usual cause):\n{seen}"
                ) from None
            (out if ok else errors)[rank] = value
        if errors:
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{msg}")
        return [out[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(_STOP)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "DistributedWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)


def run_distributed_test(
    fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0, **kwargs
) -> list[Any]:
    """One-shot: start ``world_size`` gloo ranks, run ``fn`` on each, return per-rank results."""
    with DistributedWorkers(world_size, timeout=timeout) as workers:
        return workers.run(fn, *args, **kwargs)
