#!/usr/bin/env python
"""Print parameter counts of a preset's decoder, built on the meta device (no memory).

    python tools/model_size.py --preset florence-gemma-2-xlarge [--tp 8 --pp 2]

Vision tower, projection and BART encoder (and the Florence BART decoder) are counted once
the Florence-2 side lands; until then this reports the Gemma-2 cross-attention decoder.
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size for per-rank counts")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages for per-rank counts")
    args = ap.parse_args(argv)

    from mmcap.config import ParallelConfig, get_preset, validate_decoder_layout
    from mmcap.model.size import count_decoder_parameters
    from mmcap.parallel import initialize_model_parallel

    cfg = get_preset(args.preset)
    if cfg.decoder.arch != "gemma2":
        print(
            f"{args.preset}: the Florence BART decoder is not built yet; only Gemma-2 "
            "decoders can be counted",
            file=sys.stderr,
        )
        return 2
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    validate_decoder_layout(cfg.decoder, parallel)
    initialize_model_parallel(ParallelConfig(), seed=None)
    size = count_decoder_parameters(cfg.decoder, parallel)
    print(f"preset: {args.preset}")
    print(f"decoder_total: {size.total}")
    for comp, n in sorted(size.by_component.items()):
        print(f"  {comp}: {n}")
    print(f"  per layer: {size.per_layer}")
    print(f"per rank (TP={args.tp}, PP={args.pp}):")
    for (stage, rank), n in sorted(size.per_rank.items()):
        print(f"  pp{stage} tp{rank}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
