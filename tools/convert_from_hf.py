#!/usr/bin/env python
"""Convert Hugging Face (or official) checkpoints into an mmcap distributed checkpoint.

Florence sizes (Gemma-vocabulary BART decoder, embeddings remapped by the mean rule):
    python tools/convert_from_hf.py --florence DIR --gemma-tokenizer tokenizer.model --out OUT
Gemma sizes (Florence-2 vision + encoder, Gemma-2 decoder, new gated cross-attention):
    python tools/convert_from_hf.py --florence DIR --gemma GEMMA_DIR \\
        --gemma-tokenizer tokenizer.model --out OUT [--preset florence-gemma-2-xlarge]
The paper's released models (original remote-code layout, any size, no remapping):
    python tools/convert_from_hf.py --official DIR [--gemma-tokenizer FILE] --out OUT

Without --preset the architecture is read from the checkpoints' configs. The output loads
with any TP/PP layout; --tp / --pp are checked against the model. Nothing is left at --out
unless the conversion completes.
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--florence", help="Florence-2 HF checkpoint directory")
    src.add_argument("--official", help="checkpoint directory of the official implementation")
    ap.add_argument("--gemma", help="Gemma-2 HF checkpoint directory (Gemma sizes)")
    ap.add_argument("--gemma-tokenizer", help="Gemma-2 SentencePiece tokenizer.model")
    ap.add_argument("--preset", help="mmcap preset to check the checkpoint against")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0, help="seed of newly initialised tensors")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from mmcap.hf import convert_in
    from mmcap.hf.io import CheckpointError

    try:
        if args.official:
            from mmcap.hf.convert_official import import_official

            conv = import_official(args.official, args.preset, args.image_size)
            tok_dir = Path(args.official)
        elif args.gemma:
            conv = convert_in.convert_gemma_size(
                args.florence, args.gemma, args.preset, args.image_size, args.seed
            )
            tok_dir = Path(args.florence)
        else:
            if not args.gemma_tokenizer:
                ap.error("--gemma-tokenizer is required to remap a Florence-2 decoder")
            out_parent = Path(args.out).resolve().parent
            conv = convert_in.convert_florence_size(
                args.florence,
                args.gemma_tokenizer,
                args.preset,
                out_parent,
                args.image_size,
                args.seed,
            )
            tok_dir = Path(args.florence)
        extra = {
            f"tokenizer/{p.name}": p
            for p in sorted(tok_dir.glob("*"))
            if p.name in convert_in.TOKENIZER_FILES
        }
        if args.gemma_tokenizer:
            extra["gemma/tokenizer.model"] = Path(args.gemma_tokenizer)
        out = convert_in.write_checkpoint(
            conv,
            args.out,
            tensor_parallel=args.tp,
            pipeline_parallel=args.pp,
            extra_files=extra,
            overwrite=args.overwrite,
        )
    except (CheckpointError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "out": str(out),
                "model": conv.model.name,
                **{k: v for k, v in conv.report.items() if not isinstance(v, (dict, list))},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
