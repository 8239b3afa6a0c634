#!/usr/bin/env python
"""Print parameter counts of a preset, built on the meta device (no memory).

    python tools/model_size.py --preset florence-gemma-2-xlarge [--tp 8 --pp 2]

Prints `total: <int>` and `trainable: <int>` (SYSTEM.md "What trains"), then a breakdown by
component and per TP/PP rank.
"""

import argparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size for per-rank counts")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages for per-rank counts")
    args = ap.parse_args(argv)

    from mmcap.config import ParallelConfig, get_preset, validate_layout
    from mmcap.model.size import count_parameters
    from mmcap.parallel import initialize_model_parallel

    cfg = get_preset(args.preset)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    validate_layout(cfg, parallel)
    initialize_model_parallel(ParallelConfig(), seed=None)
    size = count_parameters(cfg, parallel)
    print(f"preset: {args.preset}")
    print(f"total: {size.total}")
    print(f"trainable: {size.trainable}")
    for comp, n in size.by_component.items():
        print(f"  {comp}: {n}")
    print(f"per rank (TP={args.tp}, PP={args.pp}):")
    for (stage, rank), n in sorted(size.per_rank.items()):
        print(f"  pp{stage} tp{rank}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
