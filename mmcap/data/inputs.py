"""The input files of preprocessing and tokenizer training: paths or globs of the official
webdataset tars and of JSON-lines files."""

from __future__ import annotations

import glob
import os
from pathlib import Path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
JSONL_SUFFIXES = (".jsonl",)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, each pattern's matches sorted, duplicates dropped."""
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"--input {pat!r} matches no file")
        for m in matches:
            p = Path(m).resolve()
            if not p.name.endswith(TAR_SUFFIXES + JSONL_SUFFIXES):
                raise ValueError(
                    f"{p}: unknown input kind; expected {TAR_SUFFIXES + JSONL_SUFFIXES}"
                )
            if p not in out:
                out.append(p)
    return out
