"""Merge the JSON files of a GPU check (``tools/gpu_check.sh``) into one results file named
``<date>-<device>.json`` (kept in ``benchmarks/results/`` with the commit).

    python -m mmcap.bench.collect [--prune] OUT_DIR

``--prune`` removes the merged part files once the results file is written (the device tool
brings back at most 8 files).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mmcap.bench.report import environment, write_json

__all__ = ["collect", "results_name"]


def results_name(env: dict) -> str:
    """``<YYYY-MM-DD>-<device slug>.json`` from an :func:`environment` dict."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return f"{env['date_utc'][:10]}-{slug}.json"


def collect(out_dir: str | Path, prune: bool = False) -> Path:
    """Read every ``*.json`` of ``out_dir`` (not earlier merged files) into one file there;
    ``prune``: then remove the files merged (only after the results file is written).

    Raises:
        ValueError: a file that is not valid JSON (named; nothing is written or removed).
    """
    out_dir = Path(out_dir)
    env = environment()
    merged = {"environment": env, "parts": {}}
    parts = []
    for path in sorted(out_dir.glob("*.json")):
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}-.*\.json", path.name):
            continue  # an earlier merged file
        try:
            merged["parts"][path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        parts.append(path)
    target = out_dir / results_name(env)
    write_json(target, merged)
    if prune:
        for path in parts:
            if path != target:
                path.unlink()
    return target


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prune = "--prune" in argv
    argv = [a for a in argv if a != "--prune"]
    if len(argv) != 1:
        print("usage: python -m mmcap.bench.collect [--prune] OUT_DIR", file=sys.stderr)
        return 2
    print(f"results: {collect(argv[0], prune=prune)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
