#!/usr/bin/env python
"""Fit the paper's scaling laws to evaluated runs and plot them.

    python tools/fit_scaling_law.py runs.csv [more.csv | eval_loss.json ...] [--out DIR]

CSV columns: P, S, T, loss, optional split and C (T may be left empty: the S = 0 run of the
same P and split gives it). JSON: tools/eval_loss.py results with a compute report. Prints per
split y = b0 * P^b1 * S^b2 * T^b3 and y = a0 * C^a1 with 95% intervals and R^2, writes
fit.json and the PNG figures into --out (default: the current directory).
"""

import argparse
import json
import sys
from pathlib import Path

NAMES = {"law": {"b0": "b0", "P": "b1 (P)", "S": "b2 (S)", "T": "b3 (T)"},
         "compute": {"b0": "a0", "C": "a1 (C)"}}


def _print(kind: str, fits: dict) -> None:
    for split, fit in fits.items():
        dropped = f"  (constant, dropped: {', '.join(fit.dropped)})" if fit.dropped else ""
        print(f"[{kind}] split {split}: n={fit.n}  R^2={fit.r2:.4f}{dropped}")
        for key, value in fit.coef.items():
            lo, hi = fit.ci[key]
            print(f"    {NAMES[kind][key]:<8} {value:>12.5g}   95% CI [{lo:.5g}, {hi:.5g}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", help="CSV / eval_loss JSON / JSONL files")
    ap.add_argument("--out", default=".", help="folder for fit.json and the figures")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    from mmcap.eval.scaling_law import fit_runs, read_runs

    try:
        runs = read_runs(args.runs)
        laws, compute = fit_runs(runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print("law", laws)
    _print("compute", compute)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        kind: {s: {"coef": f.coef, "ci95": f.ci, "r2": f.r2, "n": f.n, "dropped": f.dropped}
               for s, f in fits.items()}
        for kind, fits in (("law", laws), ("compute", compute))
    }
    tmp = out / ".fit.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "fit.json")
    print(f"wrote {out / 'fit.json'}")
    if not args.no_plots:
        from mmcap.eval.scaling_plots import plot_fits

        for path in plot_fits(runs, laws, compute, out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
