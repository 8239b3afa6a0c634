#!/usr/bin/env python
"""Speed of KV-cached against uncached generation on a debug model (same tokens checked).

    python tools/bench_generate.py [--presets debug-gemma debug-florence] [--batch 4]
        [--new-tokens 64] [--device cpu|cuda] [--json out.json]

Random weights (cross-attention gates opened); EOS is disabled so every run generates exactly
``--new-tokens`` tokens after the start token. Each row: greedy or beam 4, seconds per batch
without and with the cache, the speed-up, and whether both produced the same tokens.
Prints a table, writes JSON.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time


def _model(preset: str, device: str):
    import torch

    from mmcap.config import PrecisionConfig, get_preset
    from mmcap.model.build import build_model

    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = build_model(cfg, precision=PrecisionConfig("fp32")).eval().to(device)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    return model, cfg


def _time(fn, device: str) -> tuple[float, object]:
    import torch

    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["debug-gemma", "debug-florence"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from mmcap.config import ParallelConfig
    from mmcap.generate import GenerationConfig, generate_group
    from mmcap.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    rows = []
    try:
        for preset in args.presets:
            model, cfg = _model(preset, args.device)
            g = torch.Generator().manual_seed(0)
            size = cfg.vision.image_size
            pixels = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
            prompt = torch.randint(3, 400, (args.batch, 8), generator=g).to(args.device)
            dec = torch.ones(args.batch, 1, dtype=torch.long, device=args.device)
            for beams in (1, 4):
                base = GenerationConfig(
                    num_beams=beams,
                    max_new_tokens=args.new_tokens,
                    eos_token_id=-1,  # never stop early: every run has the same length
                    forced_eos_token_id=None,
                )
                res = {}
                for use_cache in (False, True):
                    c = dataclasses.replace(base, use_cache=use_cache)
                    res[use_cache] = _time(
                        lambda c=c: generate_group(model, prompt, None, dec, c, pixels), args.device
                    )
                rows.append(
                    {
                        "preset": preset,
                        "search": "greedy" if beams == 1 else f"beam {beams}",
                        "uncached_s": res[False][0],
                        "cached_s": res[True][0],
                        "speedup": res[False][0] / res[True][0],
                        "same_tokens": bool(torch.equal(res[False][1], res[True][1])),
                    }
                )
    finally:
        destroy_model_parallel()
    print(
        f"batch {args.batch}, {args.new_tokens} new tokens, {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()})"
    )
    print(f"{'preset':<16}{'search':<9}{'uncached s':>11}{'cached s':>10}{'speed-up':>10}  same")
    for r in rows:
        print(
            f"{r['preset']:<16}{r['search']:<9}{r['uncached_s']:>11.3f}{r['cached_s']:>10.3f}"
            f"{r['speedup']:>9.1f}x  {r['same_tokens']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
