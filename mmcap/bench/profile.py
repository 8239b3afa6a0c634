"""One training step under ``torch.profiler``: where its time goes (``benchmark --profile``).

The summary answers the questions a step-time gap raises on a GPU, from one step:

- is the GPU busy? ``device_busy_s`` (the sum of the kernels' self times) against the step's
  wall time: a ratio well below 1 means the host (Python, dispatch, launches) or a sync sets
  the pace, and CUDA graphs / ``compile.enable`` are the remedies, not faster kernels;
- how many kernel launches and host syncs the step makes: ``cudaStreamSynchronize`` /
  ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` and blocking ``cudaMemcpy`` are device
  syncs; ``aten::_local_scalar_dense`` counts ``.item()`` and friends on any tensor (a device
  sync only for a CUDA tensor: on the CPU, megatron's torch-Adam fallback reads its CPU step
  counters ~50 times a step of the debug model);
- the top operators by self device time and by self host time.

On the CPU only host times exist (``device_busy_s`` is None). The optional Chrome trace
(``trace``) is for a person with a trace viewer; the summary is plain JSON.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
         "aten::_local_scalar_dense", "cudaMemcpy")  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_step(
    step: Callable[[], object], top: int = 25, trace: str | os.PathLike | None = None
) -> dict:
    """Run ``step()`` once under the profiler (CPU, and CUDA when available); return the
    summary described in the module docstring. ``trace``: also write a gzipped Chrome trace
    there (atomic)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync()
    wall = time.perf_counter() - t0
    out = summarize(prof.key_averages(), wall, cuda, top)
    if trace is not None:
        raw = f"{trace}.tmp.json"
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(f"{trace}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        os.replace(f"{trace}.tmp", trace)
        out["trace"] = str(trace)
    return out


def summarize(events, wall: float, cuda: bool, top: int = 25) -> dict:
    """The summary of ``prof.key_averages()`` (``events``) for a step of ``wall`` seconds.

    Device time is read from the device events alone (kernels, memcpy / memset): an operator's
    ``self_device_time_total`` holds the kernels it launched, which the device events hold too,
    so summing both would count each kernel twice.
    """

    def on_device(e) -> bool:
        return e.device_type != torch.autograd.DeviceType.CPU

    def row(e) -> dict:
        return {
            "name": e.key,
            "count": e.count,
            "self_host_ms": e.self_cpu_time_total / 1e3,
            "self_device_ms": e.self_device_time_total / 1e3,
        }

    kernels = [row(e) for e in events if on_device(e)]
    host = [row(e) for e in events if not on_device(e) and e.key.startswith("aten::")]
    counts = {e.key: e.count for e in events if not on_device(e)}
    busy = sum(k["self_device_ms"] for k in kernels) / 1e3 if cuda else None
    return {
        "wall_s": wall,
        "device_busy_s": busy,
        "device_busy_fraction": busy / wall if busy is not None and wall > 0 else None,
        "kernel_launches": sum(counts.get(n, 0) for n in LAUNCHES) if cuda else None,
        "host_syncs": {n: counts[n] for n in SYNCS if n in counts},
        "aten_ops": sum(o["count"] for o in host),
        "aten_self_host_s": sum(o["self_host_ms"] for o in host) / 1e3,
        # kernels (and copies) by their time on the device; operators by the device time of
        # the kernels they launched themselves; operators by their own host time
        "top_device": sorted(kernels, key=lambda o: -o["self_device_ms"])[:top],
        "top_ops_device": sorted(host, key=lambda o: -o["self_device_ms"])[:top] if cuda else [],
        "top_host": sorted(host, key=lambda o: -o["self_host_ms"])[:top],
    }


def profile_table(p: dict, rows: int = 15) -> str:
    """The summary as text (the benchmark prints it after its throughput table)."""
    if "error" in p:
        return f"profile failed: {p['error']}"
    busy = p["device_busy_fraction"]
    head = [
        f"profile of one step: wall {p['wall_s'] * 1e3:.1f} ms"
        + ("" if busy is None else f", GPU busy {p['device_busy_s'] * 1e3:.1f} ms ({busy:.0%})")
        + ("" if p["kernel_launches"] is None else f", {p['kernel_launches']} kernel launches")
        + f", {p['aten_ops']} aten ops ({p['aten_self_host_s'] * 1e3:.1f} ms self host time)",
        "host syncs: " + (", ".join(f"{k} x{v}" for k, v in p["host_syncs"].items()) or "none"),
    ]
    lines = []
    for title, key, items in (
        ("top kernels by device time", "self_device_ms", p["top_device"]),
        ("top operators by device time of their kernels", "self_device_ms", p["top_ops_device"]),
        ("top operators by self host time", "self_host_ms", p["top_host"]),
    ):
        if items:
            lines.append(f"{title}:")
            lines += [
                f"  {o[key]:10.2f} ms  x{o['count']:<6} {o['name'][:90]}" for o in items[:rows]
            ]
    return "\n".join(head + lines)
