"""Per-sample cross-entropy results and their aggregation as the paper reports them.

A sample's CE is the mean token cross-entropy over its target tokens (``<bos>``, text,
``<eos>``). Aggregates are SAMPLE-weighted: the mean over samples of the per-sample CE
(SYSTEM.md "Data": "per-sample mean token CE, then sample-weighted means"), per task-language
key (the dataset's keys, ``"caption-en"``, ``"translation-zh"``, ...) and per split:

- SC, seen captioning: ``caption-en`` + ``caption-de``;
- UC, unseen captioning: ``caption-es`` + ``caption-zh``;
- ST, seen translation: ``translation-es`` + ``translation-zh``;
- mean: all six held-out sets together (official ``summarize_results`` "mean": the
  sample-weighted mean over en/de/es/zh captioning and es/zh translation).

The JSON written by :func:`write_results` is
``{"splits": {...}, "keys": {...}, "samples": [{"id", "task", "lang", "ce", "tokens", "row"}],
"meta": {...}, "compute": {...}}`` ("meta" and "compute", :mod:`mmcap.eval.compute`, when
given); an aggregate over no samples, and a non-finite CE (a diverged model), is
written as ``"ce": null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Paper splits (SYSTEM.md "Data" / "Evaluation"): split -> the keys it averages over.
SPLITS: dict[str, tuple[str, ...]] = {
    "SC": ("caption-en", "caption-de"),
    "UC": ("caption-es", "caption-zh"),
    "ST": ("translation-es", "translation-zh"),
    "mean": (
        "caption-en",
        "caption-de",
        "caption-es",
        "caption-zh",
        "translation-es",
        "translation-zh",
    ),
}


@dataclass(frozen=True)
class SampleLoss:
    """Teacher-forced loss of one dataset entry.

    Args:
        id: the source record's id (tar key or JSONL ``id``); entries of one record share it.
        task / lang: task type ("caption", "translation") and target language.
        ce: mean token cross-entropy over the target tokens (nats).
        tokens: number of target tokens scored.
        row: entry row in the dataset (unique; ``CaptionDataset.trace(row)`` says more).
    """

    id: str
    task: str
    lang: str
    ce: float
    tokens: int
    row: int

    @property
    def key(self) -> str:
        return f"{self.task}-{self.lang}"


def _summary(samples: list[SampleLoss]) -> dict:
    n = len(samples)
    return {
        "ce": math.fsum(s.ce for s in samples) / n if n else None,
        "samples": n,
        "tokens": sum(s.tokens for s in samples),
    }


def aggregate(samples: list[SampleLoss]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(per key, per split) summaries ``{"ce", "samples", "tokens"}``; "ce" is the
    sample-weighted mean (None without samples). Every split is present; keys only if seen."""
    by_key: dict[str, list[SampleLoss]] = {}
    for s in samples:
        by_key.setdefault(s.key, []).append(s)
    keys = {k: _summary(v) for k, v in sorted(by_key.items())}
    splits = {
        name: {**_summary([s for k in members for s in by_key.get(k, [])]), "keys": list(members)}
        for name, members in SPLITS.items()
    }
    return keys, splits


@dataclass
class EvalResult:
    """Per-sample losses (sorted by dataset row) and their aggregates.

    Args:
        samples: one :class:`SampleLoss` per evaluated entry.
        keys / splits: :func:`aggregate` of ``samples`` (filled in when left empty).
    """

    samples: list[SampleLoss]
    keys: dict[str, dict] = field(default_factory=dict)
    splits: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = sorted(self.samples, key=lambda s: s.row)
        if not self.keys and not self.splits:
            self.keys, self.splits = aggregate(self.samples)

    def to_json(self, meta: dict | None = None, compute: dict | None = None) -> dict:
        """The JSON object (see the module docstring)."""
        out = {
            "splits": {k: _finite_ce(v) for k, v in self.splits.items()},
            "keys": {k: _finite_ce(v) for k, v in self.keys.items()},
            "samples": [_finite_ce(asdict(s)) for s in self.samples],
        }
        if meta is not None:
            out["meta"] = meta
        if compute is not None:
            out["compute"] = compute
        return out


def _finite_ce(d: dict) -> dict:
    ce = d["ce"]
    return {**d, "ce": ce if ce is not None and math.isfinite(ce) else None}


def write_results(
    result: EvalResult,
    path: str | os.PathLike,
    meta: dict | None = None,
    compute: dict | None = None,
) -> Path:
    """Write ``result`` as JSON atomically (temp file + fsync + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            obj = result.to_json(meta, compute)
            json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
