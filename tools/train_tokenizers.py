#!/usr/bin/env python
"""Train the encoder (BART byte-level BPE) and decoder (Gemma-style SentencePiece) tokenizers
on your own texts, in the layout tools/preprocess_data.py reads.

    python tools/train_tokenizers.py --input 'my_data/*.jsonl' --out my_tokenizers \\
        --encoder-vocab-size 8000 --decoder-vocab-size 8000

writes OUT/encoder/ (pass it as --encoder-tokenizer) and OUT/decoder/tokenizer.model (pass it
as --gemma-tokenizer). Inputs: official webdataset tars, JSONL (docs/data.md) or .txt files
(one text per line). Only for models trained from scratch: the paper's models and checkpoints
converted with tools/convert_from_hf.py use the Florence-2 and Gemma-2 tokenizers. The model's
vocabularies must hold the tokenizers: with a debug preset, model.encoder.vocab_size and
model.decoder.vocab_size at least the sizes printed, model.encoder.padded_vocab_size at least
model.encoder.vocab_size (docs/data.md). See mmcap/data/tokenizer_training.py.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files or globs (.tar, .jsonl, .txt)")
    ap.add_argument("--out", required=True, help="output folder (encoder/, decoder/tokenizer.model)")
    ap.add_argument("--encoder-vocab-size", type=int, default=8000)
    ap.add_argument("--decoder-vocab-size", type=int, default=8000)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from mmcap.data.tokenizer_training import train_tokenizers

    try:
        summary = train_tokenizers(
            args.input,
            args.out,
            args.encoder_vocab_size,
            args.decoder_vocab_size,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
