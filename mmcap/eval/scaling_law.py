"""The paper's scaling laws fitted to evaluated runs: what ``tools/fit_scaling_law.py`` runs.

Per split (SC / UC / ST, or whatever the input names):

    y = b0 * P^b1 * S^b2 * T^b3 + eps      (P parameters, S seen samples, T initial CE loss)
    y = a0 * C^a1                          (C training compute, SYSTEM.md "Evaluation")

fitted as ordinary least squares on logarithms with statsmodels (log y = log b0 + b1 log P +
...), with confidence intervals (b0 / a0 on the original scale) and R^2 of the log fit.

Input runs: a CSV with columns ``P``, ``S``, ``T``, ``loss``, optional ``split`` and ``C``; or
the JSON written by ``tools/eval_loss.py`` (``{"splits": {name: {"ce": ...}}}``) carrying a
compute report ``"compute": {"P": ..., "S": ..., "C": ...}`` at the top level or in ``meta``
(fields ``params`` / ``samples_seen`` / ``compute`` are accepted as well). T may be left out:
it is then the loss of the run with the same P and split at S = 0 (the initial model), and
runs with S = 0 only provide T. A regressor that does not vary within a split cannot be told
apart from the intercept and is dropped from that split's fit (reported).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Run:
    """One evaluated model on one split. ``where`` names the input (file:line) for errors."""

    P: float
    S: float
    loss: float
    split: str = "all"
    T: float | None = None
    C: float | None = None
    where: str = ""


@dataclass
class PowerLawFit:
    """y = coef[const] * prod x^coef[x]; ``ci`` 95% intervals; ``dropped`` constant regressors."""

    split: str
    coef: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    n: int
    dropped: list[str] = field(default_factory=list)

    def predict(self, **x: float) -> float:
        out = self.coef["b0"]
        for name, value in x.items():
            if name in self.coef:
                out *= value ** self.coef[name]
        return out


def _number(row: dict, name: str, where: str, optional: bool = False) -> float | None:
    value = row.get(name)
    if value in (None, ""):
        if optional:
            return None
        raise ValueError(f"{where}: missing field {name!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {name!r} is not a number: {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{where}: field {name!r} must be finite and >= 0, got {value!r}")
    return x


def _compute_report(obj: dict, where: str) -> dict:
    report = obj.get("compute") or obj.get("meta", {}).get("compute")
    if not isinstance(report, dict):
        raise ValueError(f"{where}: no compute report ('compute' with P, S, C) in the JSON")
    aliases = {"P": ("P", "params"), "S": ("S", "samples_seen"), "C": ("C", "compute")}
    return {k: next((report[a] for a in names if a in report), None) for k, names in aliases.items()}


def read_runs(paths: list[str | Path]) -> list[Run]:
    """Runs from CSV files and eval_loss JSON (one object, or JSONL with one per line)."""
    runs: list[Run] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f), start=2):
                    w = f"{path}:{i}"
                    runs.append(
                        Run(
                            P=_number(row, "P", w),
                            S=_number(row, "S", w),
                            loss=_number(row, "loss", w),
                            split=row.get("split") or "all",
                            T=_number(row, "T", w, optional=True),
                            C=_number(row, "C", w, optional=True),
                            where=w,
                        )
                    )
            continue
        text = path.read_text(encoding="utf-8")
        try:
            objs = [json.loads(text)]
        except json.JSONDecodeError:
            objs = []
            for i, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        objs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        for i, obj in enumerate(objs, start=1):
            w = f"{path}:{i}" if len(objs) > 1 else str(path)
            report = _compute_report(obj, w)
            for split, summary in (obj.get("splits") or {}).items():
                if summary.get("ce") is None:
                    continue  # no samples of that split (or a diverged model)
                row = {**report, "loss": summary["ce"], "T": summary.get("T")}
                runs.append(
                    Run(
                        P=_number(row, "P", w),
                        S=_number(row, "S", w),
                        loss=_number(row, "loss", w),
                        split=split,
                        T=_number(row, "T", w, optional=True),
                        C=_number(row, "C", w, optional=True),
                        where=f"{w} split {split}",
                    )
                )
    if not runs:
        raise ValueError(f"no runs in {', '.join(map(str, paths))}")
    return runs


def fill_initial_loss(runs: list[Run]) -> list[Run]:
    """Runs with S > 0, T filled from the S = 0 run of the same (P, split) where missing."""
    initial = {(r.P, r.split): r.loss for r in runs if r.S == 0}
    out = []
    for r in runs:
        if r.S == 0:
            continue
        if r.T is None:
            if (r.P, r.split) not in initial:
                raise ValueError(
                    f"{r.where}: no T and no S = 0 run with P = {r.P:g} on split {r.split!r} "
                    "to take the initial loss from"
                )
            r = Run(**{**r.__dict__, "T": initial[(r.P, r.split)]})
        out.append(r)
    return out


def fit_power_law(
    y: np.ndarray, regressors: dict[str, np.ndarray], split: str = "all"
) -> PowerLawFit:
    """OLS of log y on log regressors (+ const); constant regressors are dropped."""
    import statsmodels.api as sm

    if np.any(y <= 0) or any(np.any(x <= 0) for x in regressors.values()):
        raise ValueError(f"split {split!r}: power laws need positive values (log of 0)")
    keep = {k: np.log(x) for k, x in regressors.items() if np.ptp(np.log(x)) > 1e-12}
    dropped = [k for k in regressors if k not in keep]
    names = list(keep)
    if len(y) <= len(names) + 1:
        raise ValueError(
            f"split {split!r}: {len(y)} runs cannot fit {len(names) + 1} coefficients"
        )
    X = np.column_stack([np.ones(len(y)), *keep.values()])
    res = sm.OLS(np.log(y), X).fit()
    ci = res.conf_int(0.05)
    coef = {"b0": float(np.exp(res.params[0]))}
    intervals = {"b0": (float(np.exp(ci[0][0])), float(np.exp(ci[0][1])))}
    for j, name in enumerate(names, start=1):
        coef[name] = float(res.params[j])
        intervals[name] = (float(ci[j][0]), float(ci[j][1]))
    return PowerLawFit(split, coef, intervals, float(res.rsquared), len(y), dropped)


def fit_runs(runs: list[Run]) -> tuple[dict[str, PowerLawFit], dict[str, PowerLawFit]]:
    """(P-S-T law, compute law) per split; the compute law only for splits whose runs have C."""
    runs = fill_initial_loss(runs)
    laws, compute = {}, {}
    for split in sorted({r.split for r in runs}):
        rs = [r for r in runs if r.split == split]
        y = np.array([r.loss for r in rs])
        laws[split] = fit_power_law(
            y,
            {
                "P": np.array([r.P for r in rs]),
                "S": np.array([r.S for r in rs]),
                "T": np.array([r.T for r in rs]),
            },
            split,
        )
        if all(r.C is not None for r in rs):
            compute[split] = fit_power_law(y, {"C": np.array([r.C for r in rs])}, split)
    return laws, compute
