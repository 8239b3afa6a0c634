#!/usr/bin/env python
"""Estimate per-GPU training memory of a layout (analytic; see mmcap/train/memory.py).

    python tools/estimate_memory.py --preset florence-gemma-2-xlarge --tp 4 --pp 2 --dp 1 \\
        --micro-batch-size 4 [--recompute selective] [--image-size 224] [--json out.json]

Prints one table (component -> GiB) per pipeline-stage kind (all TP ranks of a stage hold
the same) and the peak against the GPU budget (--gpu-gib x (1 - --headroom)); writes the
estimate as JSON with --json. Exit status 0 even when the layout does not fit.

    python tools/estimate_memory.py --preset florence-gemma-2-xlarge --search --gpus 8 \\
        --global-batch-size 1024 [--image-size 768]

lists the layouts of --gpus GPUs that fit, best first (mmcap.train.memory.search_layouts).
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size")
    ap.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="required without --search")
    ap.add_argument("--global-batch-size", type=int, default=None, help="sets micro-batches/step")
    ap.add_argument("--recompute", choices=["selective", "full"], default=None)
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's (224)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--target-tokens", type=int, default=128)
    ap.add_argument("--params-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--attention", choices=["flash", "math"], default="flash")
    ap.add_argument("--gpu-gib", type=float, default=None, help="default: H100 80GB (79.6)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction kept free")
    ap.add_argument("--json", help="write the estimate here")
    ap.add_argument("--search", action="store_true", help="list the layouts that fit")
    ap.add_argument("--gpus", type=int, default=8, help="world size for --search")
    ap.add_argument("--top", type=int, default=10, help="layouts --search prints")
    args = ap.parse_args(argv)
    if args.micro_batch_size is None and not args.search:
        ap.error("--micro-batch-size is required (or use --search)")
    if args.search and args.global_batch_size is None:
        ap.error("--search needs --global-batch-size")

    from mmcap.config import ParallelConfig, get_preset
    from mmcap.config.model import replace
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.memory import GIB, H100_80GB_BYTES, estimate_memory, search_layouts

    cfg = get_preset(args.preset)
    if args.image_size is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=args.image_size))
    capacity = args.gpu_gib * GIB if args.gpu_gib else H100_80GB_BYTES
    budget = capacity * (1 - args.headroom)
    common = {
        "prompt_tokens": args.prompt_tokens,
        "target_tokens": args.target_tokens,
        "params_dtype": args.params_dtype,
        "attention": args.attention,
    }
    if args.search:
        initialize_model_parallel(ParallelConfig(), seed=None)
        found = search_layouts(
            cfg, args.gpus, args.global_batch_size, budget_bytes=budget, **common
        )
        print(
            f"{args.preset} on {args.gpus} GPUs, global batch {args.global_batch_size}, image "
            f"{cfg.vision.image_size} px, budget {budget / GIB:.1f} GiB: {len(found)} layouts fit"
        )
        print(
            f"{'TP':>3} {'PP':>3} {'DP':>3} {'SP':>5} {'mbs':>4} {'M':>4} {'recompute':>10} {'GiB':>7}"
        )
        for r in found[: args.top]:
            print(
                f"{r['tensor_parallel']:>3} {r['pipeline_parallel']:>3} {r['data_parallel']:>3} "
                f"{r['sequence_parallel']!s:>5} {r['micro_batch_size']:>4} "
                f"{r['num_microbatches']:>4} {r['recompute']!s:>10} "
                f"{r['peak_bytes'] / GIB:>7.2f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"budget_bytes": int(budget), "layouts": found}, f, indent=2)
        return 0
    parallel = ParallelConfig(
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        virtual_pipeline_parallel=args.vpp,
        sequence_parallel=args.sp,
        data_parallel=args.dp,
    )
    num_mb = None
    if args.global_batch_size is not None:
        num_mb, rest = divmod(args.global_batch_size, args.micro_batch_size * args.dp)
        if rest or not num_mb:
            ap.error("--global-batch-size must be a multiple of --micro-batch-size x --dp")
    initialize_model_parallel(ParallelConfig(), seed=None)  # parameters are counted at TP=PP=1
    est = estimate_memory(
        cfg,
        parallel,
        micro_batch_size=args.micro_batch_size,
        recompute=args.recompute,
        num_microbatches=num_mb,
        **common,
    )
    est["capacity_bytes"], est["budget_bytes"] = int(capacity), int(budget)
    est["fits"] = est["peak_bytes"] <= budget

    t = est["tokens"]
    print(
        f"{args.preset}: TP={args.tp} PP={args.pp} VPP={args.vpp or 1} DP={args.dp} "
        f"SP={args.sp} micro-batch={args.micro_batch_size} recompute={args.recompute} "
        f"tokens: {t['image']} image + {args.prompt_tokens} prompt / {t['decoder']} target"
    )
    names = list(est["stages"][0]["bytes"])
    print(
        f"{'component (GiB)':<16}" + "".join(f"{'pp' + str(s['stage']):>10}" for s in est["stages"])
    )
    for name in names:
        print(f"{name:<16}" + "".join(f"{s['bytes'][name] / GIB:>10.2f}" for s in est["stages"]))
    print(f"{'total':<16}" + "".join(f"{s['total'] / GIB:>10.2f}" for s in est["stages"]))
    print(f"{'in flight (mb)':<16}" + "".join(f"{s['in_flight']:>10.2f}" for s in est["stages"]))
    verdict = "fits" if est["fits"] else "DOES NOT FIT"
    print(
        f"peak {est['peak_bytes'] / GIB:.2f} GiB (pp{est['peak_stage']}) vs budget "
        f"{budget / GIB:.2f} GiB ({capacity / GIB:.1f} GiB x {1 - args.headroom:.2f}): {verdict}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
