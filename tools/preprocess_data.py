#!/usr/bin/env python
"""Tokenize official webdataset tars / JSONL into an indexed caption dataset.

    python tools/preprocess_data.py --input 'shards/cc12m-train-*.tar' \\
        --gemma-tokenizer gemma-2/tokenizer.model --encoder-tokenizer Florence-2-large/ \\
        --out data/cc12m [--workers 8]

Output layout, resume and atomicity: see mmcap/data/preprocess.py. Skipped records are
counted per reason in OUT/manifest.json and listed in OUT/rejects.jsonl.
"""

import argparse
import json
import logging
import sys

EPILOG = """\
inputs (docs/data.md has the full schema):
  JSONL, one record per line:
    {"id": "r1", "image": "imgs/a.jpg", "type": "caption", "lang": "de",
     "prompt": "<LANG_DE><CAPTION>", "output": "Ein Hund im Gras."}
    image: a JPEG path relative to the JSONL file (omit it for a text-only translation)
  webdataset tars: {key}.jpg + {key}.data, the .data a JSON list of
    {"type", "lang", "prompt", "output"} (official pretraining and fine-tuning layouts)
  type: caption | translation; lang (the target language): en de fr es zh ru
  prompt: a task string [<LANG_XX>]<CAPTION> | <DETAILED_CAPTION> | <MORE_DETAILED_CAPTION>
    | <TRANSLATE>source text, or the already expanded prompt text

tokenizers: the paper's models use Florence-2's tokenizer directory (--encoder-tokenizer) and
  Gemma-2's tokenizer.model (--gemma-tokenizer). To train both on your own texts (models
  trained from scratch): tools/train_tokenizers.py --input ... --out DIR, then pass
  DIR/encoder and DIR/decoder/tokenizer.model. The output dataset keeps a copy of both
  (OUT/tokenizers/); training checkpoints carry them on to the Hugging Face export.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--input", nargs="+", required=True, help="files or globs (.tar, .tar.gz, .jsonl)"
    )
    ap.add_argument(
        "--gemma-tokenizer", required=True, help="Gemma-2 SentencePiece tokenizer.model"
    )
    ap.add_argument("--encoder-tokenizer", required=True, help="Florence-2 tokenizer directory")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-target-tokens", type=int, default=1024)
    ap.add_argument("--max-text-chars", type=int, default=16384)
    ap.add_argument(
        "--no-verify-images",
        action="store_true",
        help="check JPEG signature/header only instead of decoding every image",
    )
    ap.add_argument(
        "--long-entries",
        choices=["reject", "keep"],
        default="reject",
        help="entries over --max-prompt-tokens / --max-target-tokens: skip (too_long) or keep "
        "whole and crop when batched (official); counted in the manifest either way",
    )
    ap.add_argument(
        "--truncated-images",
        choices=["reject", "load"],
        default="reject",
        help="truncated JPEGs: skip (bad_image) or keep and load with the tail grey (official "
        "PIL LOAD_TRUNCATED_IMAGES); counted in the manifest either way",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mmcap.data.config import PreprocessConfig
    from mmcap.data.preprocess import preprocess

    cfg = PreprocessConfig(
        max_prompt_tokens=args.max_prompt_tokens,
        max_target_tokens=args.max_target_tokens,
        max_text_chars=args.max_text_chars,
        workers=args.workers,
        verify_images=not args.no_verify_images,
        long_entries=args.long_entries,
        truncated_images=args.truncated_images,
    )
    manifest = preprocess(
        args.input,
        args.gemma_tokenizer,
        args.encoder_tokenizer,
        args.out,
        cfg,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    summary = {k: manifest[k] for k in ("counts", "per_key", "rejects", "fingerprint")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
