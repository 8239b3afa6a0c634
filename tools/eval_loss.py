#!/usr/bin/env python
"""Teacher-forced cross-entropy of a checkpoint on a preprocessed dataset, per sample, per
task-language key and per paper split (SC / UC / ST).

    python tools/eval_loss.py --ckpt CKPT_DIR --data DATA_DIR --out results.json
    torchrun --nproc-per-node 8 tools/eval_loss.py --ckpt CKPT_DIR --data DATA_DIR \\
        --out results.json --tp 2 --pp 2          # DP = 8 / (2 x 2) replicas split the samples

JSON: {"splits": {...}, "keys": {...}, "samples": [{"id", "task", "lang", "ce", "tokens",
"row"}, ...], "meta": {...}} (see mmcap/eval/results.py), written atomically by rank 0.
"""

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
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
        type=int,
        default=None,
        help="image side in pixels (default: the checkpoint's)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--max-target-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig
    from mmcap.data.config import BatchConfig
    from mmcap.eval import run_eval_loss

    try:
        parallel = ParallelConfig(
            tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline_parallel=args.vpp
        )
        batch_cfg = BatchConfig(
            max_prompt_tokens=args.max_prompt_tokens, max_target_tokens=args.max_target_tokens
        )
        result = run_eval_loss(
            args.ckpt,
            args.data,
            args.out,
            parallel=parallel,
            precision=PrecisionConfig(args.precision),
            micro_batch_size=args.micro_batch_size,
            image_size=args.image_size,
            batch_cfg=batch_cfg,
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
