#!/usr/bin/env python
"""Teacher-forced cross-entropy of a checkpoint on a preprocessed dataset, per sample, per
task-language key and per paper split (SC / UC / ST).

    python tools/eval_loss.py --ckpt CKPT_DIR --data DATA_DIR --out results.json
    torchrun --nproc-per-node 8 tools/eval_loss.py --ckpt CKPT_DIR --data DATA_DIR \\
        --out results.json --tp 2 --pp 2          # DP = 8 / (2 x 2) replicas split the samples

Defaults are the official CE eval's (src/eval_loss.py): 224 px images, prompts cropped to 447
and targets to 1024 tokens keeping the final </s> / <eos>; training uses 128 / 128. An entry
that would not fit the model's position tables stops the run before it starts, naming the
lengths and the limit.

Compute report (the paper's S and C, mmcap/eval/compute.py): with --training-steps N
--training-batch-size B, or read from the checkpoint when it is a training checkpoint
(step_<N>/train_state.json + the run's train_config.json), the JSON also holds "compute":
S = N x B, the forward FLOPs and MACs of one sample at 224 px and 128 / 128 tokens, total and
trainable parameters, factor 1 + P_trainable / P and C = S x MACs x factor ("training_macs").

JSON: {"splits": {...}, "keys": {...}, "samples": [{"id", "task", "lang", "ce", "tokens",
"row"}, ...], "meta": {...}, "compute": {...}} (see mmcap/eval/results.py), written atomically
by rank 0. "splits" holds SC, UC, ST and "mean" (all six held-out sets).
"""

import argparse
import json
import logging
import sys


def _image_size(value: str) -> int | None:
    if value == "checkpoint":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--image-size must be a positive integer or 'checkpoint', got {value!r}")
    return int(value)


def main(argv=None) -> int:
    from mmcap.eval.lengths import EVAL_IMAGE_SIZE, EVAL_MAX_PROMPT_TOKENS, EVAL_MAX_TARGET_TOKENS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="mmcap distributed checkpoint directory")
    ap.add_argument("--data", required=True, help="preprocessed dataset directory")
    ap.add_argument("--out", help="results JSON (default: print the splits only)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument(
        "--image-size",
        default=str(EVAL_IMAGE_SIZE),
        help="image side in pixels, or 'checkpoint' for the checkpoint's (default: %(default)s,"
        " the official CE eval's)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-prompt-tokens", type=int, default=EVAL_MAX_PROMPT_TOKENS)
    ap.add_argument("--max-target-tokens", type=int, default=EVAL_MAX_TARGET_TOKENS)
    ap.add_argument(
        "--crop",
        choices=["keep-eos", "cut"],
        default="keep-eos",
        help="keep-eos: a cropped sequence ends in its </s> / <eos> (tokenizer truncation, the "
        "official eval); cut: ids[:L] (the official training loader)",
    )
    ap.add_argument("--training-steps", type=int, help="steps of the run (compute report)")
    ap.add_argument("--training-batch-size", type=int, help="global batch size of the run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig
    from mmcap.eval import run_eval_loss
    from mmcap.eval.compute import resolve_training_run
    from mmcap.eval.lengths import eval_batch_config

    try:
        parallel = ParallelConfig(
            tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline_parallel=args.vpp
        )
        batch_cfg = eval_batch_config(
            args.max_prompt_tokens, args.max_target_tokens, args.crop == "keep-eos"
        )
        image_size = _image_size(args.image_size)
        training_run = resolve_training_run(
            args.ckpt, args.training_steps, args.training_batch_size
        )
        result = run_eval_loss(
            args.ckpt,
            args.data,
            args.out,
            parallel=parallel,
            precision=PrecisionConfig(args.precision),
            micro_batch_size=args.micro_batch_size,
            image_size=image_size,
            batch_cfg=batch_cfg,
            training_run=training_run,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"splits": result.splits, "out": args.out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
