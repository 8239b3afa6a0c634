#!/usr/bin/env python
"""Caption images with an mmcap checkpoint or an exported Hugging Face directory.

    python tools/caption.py --ckpt DIR --image a.jpg b.jpg --lang de [--prefix] [--beams 4]
        [--max-new-tokens 128] [--image-size 768]

Prints one caption per image, in order. ``--prefix`` starts the decoder with the zero-shot
prefix of the language ("Das Bild zeigt", ...) and prints the text after it. A training
checkpoint carries no tokenizers: pass ``--bart-tokenizer DIR --gemma-tokenizer FILE``.
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from mmcap.generate.pipeline import add_generation_args

    add_generation_args(ap)
    ap.add_argument("--image", nargs="+", required=True, help="image files")
    ap.add_argument("--prefix", action="store_true", help="zero-shot decoder prefix")
    args = ap.parse_args(argv)

    from mmcap.generate.pipeline import caption, generation_config, load_pipeline

    try:
        cfg = generation_config(args.beams, args.max_new_tokens, args.text_rows_only)
        pipe = load_pipeline(args.ckpt, args.image_size, args.bart_tokenizer, args.gemma_tokenizer)
        lines = caption(pipe, args.image, args.lang, args.prefix, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
