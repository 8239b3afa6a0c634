#!/usr/bin/env python
"""Downstream evaluation of a checkpoint on the paper's task sets (official dataset layouts).

    python tools/eval_downstream.py --ckpt DIR --data-root EVAL_ROOT --out OUT \
        [--tasks full|caption|translation|ambiguity|en_caption|TASK,...] [--use-prefix]
        [--input-res 768] [--beams 4] [--batch-size 8] [--official-multi30k-bleu]
        [--comet-model PATH] [--no-meteor] [--meteor-jar JAR] [--limit N]

``--ckpt``: an mmcap checkpoint (fresh conversion or training checkpoint; pass
``--bart-tokenizer`` / ``--gemma-tokenizer`` for the latter) or an exported HF directory.
Writes ``OUT/eval_results.json``, ``OUT/eval_results.md`` and one prediction cache per task
(a rerun reuses them; an interrupted run resumes). Exit status 2 on a bad input (named).
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, help="mmcap checkpoint or exported HF directory")
    ap.add_argument("--data-root", required=True, help="eval datasets root (official layout)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tasks", default="full", help="set or task names, comma-separated")
    ap.add_argument("--use-prefix", action="store_true", help="zero-shot prefix (captioning)")
    ap.add_argument(
        "--input-res",
        type=int,
        default=None,
        help="image size (mmcap checkpoints; default: the checkpoint's; official 768)",
    )
    ap.add_argument("--beams", type=int, default=4, help="1 = greedy (default 4, official)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--text-rows-only",
        action="store_true",
        help="never generate the decoder rows past the Gemma tokenizer",
    )
    ap.add_argument(
        "--official-multi30k-bleu",
        action="store_true",
        help="Multi30K captioning SacreBLEU as the official code (first 5 hypotheses)",
    )
    ap.add_argument("--comet-model", default=None, help="local COMET checkpoint (unbabel-comet)")
    ap.add_argument("--no-meteor", action="store_true", help="skip pycocoevalcap METEOR")
    ap.add_argument(
        "--meteor-jar",
        default=None,
        help="official meteor-1.5.jar (with data/) for the official METEOR",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N samples per task")
    ap.add_argument("--bart-tokenizer", default=None, help="BART tokenizer dir (training ckpt)")
    ap.add_argument("--gemma-tokenizer", default=None, help="Gemma tokenizer.model (training ckpt)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pathlib import Path

    from mmcap.eval.downstream import DownstreamOptions, run_downstream
    from mmcap.eval.downstream.model import load_downstream_model
    from mmcap.eval.downstream.runner import RESULTS_MD
    from mmcap.generate.pipeline import generation_config

    try:
        opts = DownstreamOptions(
            data_root=args.data_root,
            out=args.out,
            tasks=args.tasks,
            batch_size=args.batch_size,
            official_multi30k_bleu=args.official_multi30k_bleu,
            meteor=not args.no_meteor,
            comet_model=args.comet_model,
            limit=args.limit,
            meteor_jar=args.meteor_jar,
        )
        cfg = generation_config(args.beams, args.max_new_tokens, args.text_rows_only)
        model = load_downstream_model(
            args.ckpt,
            cfg,
            args.use_prefix,
            args.input_res,
            args.bart_tokenizer,
            args.gemma_tokenizer,
        )
        settings = {
            "ckpt": str(Path(args.ckpt).resolve()),
            "use_prefix": args.use_prefix,
            "image_size": model.image_size,
            "beams": args.beams,
            "max_new_tokens": args.max_new_tokens,
            "text_rows_only": args.text_rows_only,
        }
        out = run_downstream(model, opts, settings)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((opts.out / RESULTS_MD).read_text(encoding="utf-8"), end="")
    if not out["results"]:
        print("error: no task was evaluated (see skipped tasks above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
