"""Useful-token fractions and FLOPs per sample, padded vs packed, on realistic lengths.

    python tools/packing_report.py                      # official length statistics
    python tools/packing_report.py --lengths DATASET_DIR --preset florence-2-large
    python tools/packing_report.py --means caption-en=17/58,translation-de=60/55 \\
        --rows 360x184 --rows 512x264 --json out.json

Prints a markdown table (mmcap/bench/packing_report.py says what each column counts) and
writes it as JSON with --json. Runs on CPU in seconds (no model is built).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcap.bench.lengths import LengthModel  # noqa: E402
from mmcap.bench.packing_report import packing_report, report_markdown  # noqa: E402
from mmcap.config import get_preset  # noqa: E402


def _rows(text: str) -> tuple[int, int]:
    try:
        e, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: expected ENCxDEC, e.g. 360x184") from None
    return e, d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="florence-gemma-2-large")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--lengths", help="a preprocessed dataset (directory or manifest.json)")
    src.add_argument("--means", help="per-key prompt/target means: KEY=P/T,KEY=P/T,...")
    ap.add_argument("--text-only-translations", action="store_true",
                    help="translations carry no image (JSONL translation data); default: every "
                    "sample has its image, as in the paper's data")
    ap.add_argument("--sigma", type=float, default=0.5, help="log-normal spread of lengths")
    ap.add_argument("--samples", type=int, default=1024, help="global batch (samples)")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel ranks (each packs its share)")
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-target", type=int, default=128)
    ap.add_argument("--rows", type=_rows, action="append",
                    help="packed row lengths ENCxDEC (repeatable; default one-sample and auto rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args(argv)
    try:
        if a.lengths:
            lm = LengthModel.from_manifest(a.lengths, a.sigma, a.text_only_translations)
        elif a.means:
            lm = LengthModel.from_means(a.means, a.sigma)
        else:
            lm = LengthModel.official(a.sigma, a.text_only_translations)
        rep = packing_report(
            get_preset(a.preset), lm, samples=a.samples, dp=a.dp, rows=a.rows,
            max_prompt=a.max_prompt, max_target=a.max_target, seed=a.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report_markdown(rep))
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rep, indent=1))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
