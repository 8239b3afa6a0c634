#!/usr/bin/env python
"""Translate English text with an mmcap checkpoint (text only; no image).

    python tools/translate.py --ckpt DIR --lang fr --text "A dog runs." ["Another."]
    python tools/translate.py --ckpt DIR --lang fr --file sentences.txt   # one per line

Same generation flags as tools/caption.py; prints one translation per input line. An exported
HF directory works with ``--image`` (one image per text, as Multi30K / CoMMuTE).
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from mmcap.generate.pipeline import add_generation_args

    add_generation_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="source sentences")
    src.add_argument("--file", help="UTF-8 file, one source sentence per line")
    ap.add_argument("--image", nargs="+", default=None, help="one image per text (optional)")
    args = ap.parse_args(argv)

    from mmcap.generate.pipeline import generation_config, load_pipeline, translate

    try:
        if args.file:
            with open(args.file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f]
        else:
            texts = list(args.text)
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty or not texts:
            raise ValueError(f"{args.file or '--text'}: empty source text at line(s) {empty}")
        if args.image and len(args.image) != len(texts):
            raise ValueError(f"{len(args.image)} images for {len(texts)} texts")
        cfg = generation_config(args.beams, args.max_new_tokens, args.text_rows_only)
        pipe = load_pipeline(args.ckpt, args.image_size, args.bart_tokenizer, args.gemma_tokenizer)
        lines = translate(pipe, texts, args.lang, cfg, args.image)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
