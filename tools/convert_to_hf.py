#!/usr/bin/env python
"""Export an mmcap checkpoint (any TP/PP layout) to a Hugging Face directory.

    python tools/convert_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--dtype bf16]

After ``import mmcap.hf`` the directory loads with
``transformers.AutoModelForImageTextToText.from_pretrained(HF_DIR)`` and
``AutoProcessor.from_pretrained(HF_DIR)`` (no trust_remote_code). The processor's tokenizers
come from the checkpoint (training checkpoints carry them in ``inference/``, copied from the
dataset); for a checkpoint without them pass ``--tokenizers DATASET_DIR`` or
``--encoder-tokenizer DIR --gemma-tokenizer FILE``, else the export refuses (``--weights-only``
exports the weights alone).

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
    ap.add_argument(
        "--tokenizers",
        metavar="DIR",
        help="where the tokenizers are when the checkpoint lacks them: the training dataset "
        "(tools/preprocess_data.py output), a checkpoint, or a folder with encoder/ and "
        "decoder/tokenizer.model",
    )
    ap.add_argument("--encoder-tokenizer", metavar="DIR", help="Florence-2 tokenizer directory")
    ap.add_argument("--gemma-tokenizer", metavar="FILE", help="Gemma-2 SentencePiece tokenizer.model")
    ap.add_argument(
        "--weights-only", action="store_true", help="no processor: config and weights only"
    )
    args = ap.parse_args(argv)
    if bool(args.encoder_tokenizer) != bool(args.gemma_tokenizer):
        ap.error("--encoder-tokenizer and --gemma-tokenizer go together")
    if args.tokenizers and args.encoder_tokenizer:
        ap.error("give --tokenizers or --encoder-tokenizer / --gemma-tokenizer, not both")

    from mmcap.hf.convert_out import DTYPES, export_to_hf
    from mmcap.hf.io import CheckpointError

    try:
        if args.layout == "official":
            from mmcap.hf.official_layout import export_official

            out = export_official(
                args.ckpt, args.out, DTYPES[args.dtype], args.max_shard_size, args.overwrite
            )
        else:
            tokenizers = args.tokenizers
            if args.encoder_tokenizer:
                from pathlib import Path

                from mmcap.checkpoint.inference_assets import TokenizerFiles

                tokenizers = TokenizerFiles(
                    Path(args.encoder_tokenizer), Path(args.gemma_tokenizer), "command line"
                )
            out = export_to_hf(
                args.ckpt,
                args.out,
                args.dtype,
                args.max_shard_size,
                args.overwrite,
                tokenizers=tokenizers,
                weights_only=args.weights_only,
            )
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {out} ({args.layout} layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
