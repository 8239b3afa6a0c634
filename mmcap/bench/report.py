"""Tables and the JSON file of a benchmark run (``tools/benchmark.py``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from mmcap.bench.phases import PHASES

__all__ = ["attention_table", "environment", "throughput_table", "write_json"]


def environment() -> dict:
    """Where the numbers come from: date, device, versions, commit."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": commit,
    }


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    return format(v, spec)


def throughput_table(results: list[dict]) -> str:
    """One column per implementation; rows: throughput, FLOPs, memory, phases; the ratio
    mmcap / official-style when both are present."""
    rows = [
        ("step time (s, median)", "step_time_s", ".4g"),
        ("samples/s", "samples_per_s", ".4g"),
        ("images/s", "images_per_s", ".4g"),
        ("target tokens/s", "target_tokens_per_s", ".4g"),
        ("TFLOP/s per GPU", "tflops_per_gpu", ".4g"),
        ("MFU", "mfu", ".1%"),
        ("peak memory (GiB)", "peak_memory_gib", ".3g"),
        ("micro-batches / rank", "num_microbatches", "d"),
        ("useful tokens encoder", "useful_encoder", ".1%"),
        ("useful tokens decoder", "useful_decoder", ".1%"),
        ("trainable params", "trainable_params", ",d"),
        ("total params", "total_params", ",d"),
        ("optimizer", "optimizer", "s"),
    ]
    names = [r["impl"] for r in results]
    width = max(12, *(len(n) for n in names), *(len(str(r.get("optimizer", ""))) for r in results))
    lines = [f"{'':28s}" + "".join(f"{n:>{width + 2}s}" for n in names)]
    for label, key, spec in rows:
        lines.append(
            f"{label:28s}" + "".join(f"{_fmt(r.get(key), spec):>{width + 2}s}" for r in results)
        )
    phased = [r for r in results if "phases_s" in r]
    if phased:
        lines.append("phases of the step (s, max over ranks; forward for model parts):")
        for p in PHASES:
            cells = "".join(
                f"{_fmt(r['phases_s'][p], '.4g') if 'phases_s' in r else '':>{width + 2}s}"
                for r in results
            )
            lines.append(f"  {p:26s}" + cells)
    by = {r["impl"]: r for r in results}
    if "mmcap" in by and "hf-official-style" in by:
        ratio = by["hf-official-style"]["step_time_s"] / by["mmcap"]["step_time_s"]
        lines.append(f"throughput ratio mmcap / official-style: {ratio:.2f}x")
    if "mmcap" in by and "mmcap-packed" in by:
        ratio = by["mmcap-packed"]["samples_per_s"] / by["mmcap"]["samples_per_s"]
        lines.append(f"samples/s ratio packed / padded: {ratio:.2f}x")
    return "\n".join(lines)


def attention_table(rows: list[dict]) -> str:
    """One line per (shape, back-end)."""
    head = f"{'shape':34s}{'backend':>8s}{'fwd ms':>10s}{'fwd+bwd ms':>12s}{'TFLOP/s':>10s}  note"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['shape']:34s}{r['backend']:>8s}{_fmt(r.get('fwd_ms'), '.4g'):>10s}"
            f"{_fmt(r.get('fwd_bwd_ms'), '.4g'):>12s}{_fmt(r.get('tflops'), '.4g'):>10s}  "
            f"{r.get('note', '')}"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Atomic write (temp file + rename) of the run's JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
