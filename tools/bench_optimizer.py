"""Optimizer-step benchmark on a preset's trainable parameters (issue 13 item 6).

    python tools/bench_optimizer.py [--preset florence-gemma-2-large] [--steps 5] [--json out.json]

Times torch's AdamW fused / foreach / for-loop (``optim.implementation``) and megatron-core's
Python-loop grad-norm / clip-scale fallbacks (used without apex / TE) against mmcap's
``_foreach`` ones (:mod:`mmcap.parallel.multi_tensor`), on one float32 tensor per trainable
parameter (what the distributed optimizer steps at DP=1). Prints a table, writes JSON. Default
preset: florence-gemma-2-large on CUDA, debug-gemma elsewhere (CPU numbers say nothing about
the GPU). Library: :mod:`mmcap.bench.optimizer_bench`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None)
    p.add_argument("--steps", type=int, default=5, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)

    import torch

    from mmcap.bench.optimizer_bench import optimizer_table, run_optimizer_benchmark
    from mmcap.bench.report import environment, write_json
    from mmcap.config import ConfigError, ParallelConfig, get_preset
    from mmcap.parallel import destroy_model_parallel, initialize_model_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("florence-gemma-2-large" if device.type == "cuda" else "debug-gemma")
    try:
        get_preset(preset)
    except (ConfigError, KeyError) as e:
        print(f"bench_optimizer: {e}", file=sys.stderr)
        return 2
    initialize_model_parallel(ParallelConfig(), seed=None)  # parameters are counted at TP=PP=1
    try:
        result = run_optimizer_benchmark(preset, device, args.steps, args.warmup)
    finally:
        destroy_model_parallel()
    print(optimizer_table(result))
    if args.json:
        write_json(args.json, {"environment": environment(), "optimizer": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
