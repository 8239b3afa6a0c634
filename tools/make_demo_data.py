#!/usr/bin/env python
"""Build the demo dataset from the photographs and texts shipped in examples/demo/.

    python tools/make_demo_data.py --out data/demo [--preprocess] [--seed 0] [--overwrite]

writes DIR/sources (official webdataset tars: train shards with captions en/de and
translations en->{de,fr,es,zh,ru}, a held-out eval shard with the SC/UC/ST keys, and two tiny
tokenizers trained on the demo texts) and, with --preprocess, the indexed datasets DIR/train
and DIR/eval (tools/preprocess_data.py's format). DIR is complete once DIR/demo.json exists;
re-running on a complete DIR does nothing unless --overwrite. No network is used.

Regenerating the shipped JPEGs (maintainers only; needs scikit-image, not a dependency):

    pip install --target /tmp/skimg scikit-image==0.26.0
    python tools/make_demo_data.py --extract-images --skimage-data /tmp/skimg/skimage/data

See mmcap/data/demo.py and examples/demo/README.md.
"""

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path


def _skimage_data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("skimage")  # locate only: importing needs scipy etc.
    if spec is None or spec.origin is None:
        sys.exit(
            "scikit-image is not installed: pip install --target /tmp/skimg "
            "scikit-image==0.26.0, then pass --skimage-data /tmp/skimg/skimage/data"
        )
    return Path(spec.origin).parent / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="output folder (sources, and datasets with --preprocess)")
    ap.add_argument("--preprocess", action="store_true", help="also build DIR/train, DIR/eval")
    ap.add_argument("--seed", type=int, default=0, help="orders train images over the shards")
    ap.add_argument("--overwrite", action="store_true", help="rebuild an existing DIR")
    ap.add_argument(
        "--extract-images",
        action="store_true",
        help="regenerate examples/demo/images/*.jpg from scikit-image's sample data",
    )
    ap.add_argument("--skimage-data", help="scikit-image's skimage/data folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mmcap.data.demo import build_demo_dataset, export_demo_images

    if args.extract_images:
        written = export_demo_images(_skimage_data_dir(args.skimage_data))
        total = sum(p.stat().st_size for p in written)
        print(f"wrote {len(written)} images, {total / 1e6:.2f} MB, to {written[0].parent}")
        if not args.out:
            return 0
    if not args.out:
        ap.error("--out is required (unless only --extract-images)")
    info = build_demo_dataset(
        args.out, seed=args.seed, preprocess=args.preprocess, overwrite=args.overwrite
    )
    print(json.dumps(info, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
