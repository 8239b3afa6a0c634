#!/usr/bin/env python
"""Export an mmcap checkpoint (any TP/PP layout) to a Hugging Face directory.

    python tools/convert_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--dtype bf16]

After ``import mmcap.hf`` the directory loads with
``transformers.AutoModelForImageTextToText.from_pretrained(HF_DIR)`` (no trust_remote_code).

    python tools/convert_to_hf.py --ckpt CKPT_DIR --out DIR --layout official

writes the paper's released-model layout instead (original Florence-2 remote-code keys and
config, what the official scripts' ``from_pretrained`` and ``convert_from_hf.py --official``
read).
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, help="mmcap distributed checkpoint directory")
    ap.add_argument("--out", required=True, help="Hugging Face output directory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument(
        "--layout",
        default="hf",
        choices=["hf", "official"],
        help="hf: mmcap's transformers classes; official: the paper's released-model layout",
    )
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from mmcap.hf.convert_out import DTYPES, export_to_hf
    from mmcap.hf.io import CheckpointError

    try:
        if args.layout == "official":
            from mmcap.hf.official_layout import export_official

            out = export_official(
                args.ckpt, args.out, DTYPES[args.dtype], args.max_shard_size, args.overwrite
            )
        else:
            out = export_to_hf(
                args.ckpt, args.out, args.dtype, args.max_shard_size, args.overwrite
            )
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {out} ({args.layout} layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
