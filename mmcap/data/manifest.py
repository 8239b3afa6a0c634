"""Counts and token statistics of a dataset, and its ``manifest.json``.

Token statistics follow the official ``tok_counts.json`` layout: for each of
``total_prompt_count``, ``max_prompt_count``, ``total_output_count``, ``max_output_count``
and ``sample_count`` a ``{task: {lang: n}}`` table. Counts are of the stored ids, specials
included (``<s> ... </s>`` prompts, ``<bos> ... <eos>`` targets).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

from mmcap.data.records import REJECT_REASONS

TOK_COUNT_FIELDS = (
    "total_prompt_count",
    "max_prompt_count",
    "total_output_count",
    "max_output_count",
    "sample_count",
)


class DatasetStats:
    """Accumulates per-key token statistics, record/entry counts and rejects."""

    def __init__(self):
        self.tok = {f: {} for f in TOK_COUNT_FIELDS}
        self.rejects: Counter = Counter()
        self.records_seen = self.records_kept = 0
        self.entries_seen = self.entries_kept = 0
        # Over the preprocessing token limits / truncated JPEGs: kept or rejected, per the
        # PreprocessConfig switches, and counted either way.
        self.long_entries = self.truncated_images = 0

    def add_entry(self, key: str, n_prompt: int, n_output: int) -> None:
        task, lang = key.split("-")
        for f, v, op in (
            ("total_prompt_count", n_prompt, "sum"),
            ("max_prompt_count", n_prompt, "max"),
            ("total_output_count", n_output, "sum"),
            ("max_output_count", n_output, "max"),
            ("sample_count", 1, "sum"),
        ):
            table = self.tok[f].setdefault(task, {})
            table[lang] = (table.get(lang, 0) + v) if op == "sum" else max(table.get(lang, 0), v)
        self.entries_kept += 1

    def add_reject(self, reason: str) -> None:
        assert reason in REJECT_REASONS, reason
        self.rejects[reason] += 1

    def to_json(self) -> dict:
        return {
            "tok_counts": self.tok,
            "rejects": dict(self.rejects),
            "records_seen": self.records_seen,
            "records_kept": self.records_kept,
            "entries_seen": self.entries_seen,
            "entries_kept": self.entries_kept,
            "long_entries": self.long_entries,
            "truncated_images": self.truncated_images,
        }

    @classmethod
    def from_json(cls, d: dict) -> DatasetStats:
        s = cls()
        s.tok = d["tok_counts"]
        s.rejects = Counter(d["rejects"])
        for f in ("records_seen", "records_kept", "entries_seen", "entries_kept"):
            setattr(s, f, d[f])
        s.long_entries = d.get("long_entries", 0)
        s.truncated_images = d.get("truncated_images", 0)
        return s

    def merge(self, other: DatasetStats) -> None:
        for f in TOK_COUNT_FIELDS:
            for task, langs in other.tok[f].items():
                table = self.tok[f].setdefault(task, {})
                for lang, v in langs.items():
                    table[lang] = (
                        max(table.get(lang, 0), v)
                        if f.startswith("max")
                        else table.get(lang, 0) + v
                    )
        self.rejects.update(other.rejects)
        for f in (
            "records_seen",
            "records_kept",
            "entries_seen",
            "entries_kept",
            "long_entries",
            "truncated_images",
        ):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def per_key(self) -> dict[str, int]:
        return {
            f"{t}-{lang}": n
            for t, langs in sorted(self.tok["sample_count"].items())
            for lang, n in sorted(langs.items())
        }


def build_manifest(
    *,
    fmt: str,
    sources: list[dict],
    tokenizers: dict,
    config: dict,
    counts: dict,
    stats: DatasetStats,
    files_dir: Path,
) -> dict:
    """The manifest dict; ``fingerprint`` hashes everything but the creation time."""
    files = {p.name: p.stat().st_size for p in sorted(files_dir.iterdir()) if p.is_file()}
    body = {
        "format": fmt,
        "complete": True,
        "sources": sources,
        "tokenizers": tokenizers,
        "config": config,
        "counts": {
            **counts,
            "records_seen": stats.records_seen,
            "records_kept": stats.records_kept,
            "entries_seen": stats.entries_seen,
            "long_entries": stats.long_entries,
            "truncated_images": stats.truncated_images,
        },
        "per_key": stats.per_key(),
        "token_stats": stats.tok,
        "rejects": {r: stats.rejects.get(r, 0) for r in REJECT_REASONS},
        "files": files,
    }
    body["fingerprint"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    body["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return body


def write_json_durable(path: Path, obj: dict) -> None:
    """Write JSON via a temp file + fsync + rename, so readers see all of it or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
