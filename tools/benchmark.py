"""Training throughput benchmark of mmcap on synthetic data (no dataset or checkpoint).

    python tools/benchmark.py --preset debug-gemma --steps 3 --json out.json
    python tools/benchmark.py --preset debug-gemma --steps 3 --compare hf
    torchrun --nproc-per-node 8 tools/benchmark.py --preset florence-gemma-2-xlarge --tp 2 \\
        --micro-batch-size 8 --num-microbatches 4 --image-size 224
    python tools/benchmark.py --attention-only --attention-model 2b

Prints a table and (``--json``) writes step time, samples / images / target tokens per second,
TFLOP/s per GPU and MFU (the trainer's FLOP formula), peak memory and the per-phase split.
The library code lives in :mod:`mmcap.bench`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    from mmcap.train.optim_config import ADAM_IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug-gemma")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (DP = the rest)")
    p.add_argument("--micro-batch-size", type=int, default=2)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--num-microbatches", type=int, default=1, help="per DP rank and step")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: the preset's)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--target-tokens", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument(
        "--transformer-impl",
        default="auto",
        choices=["auto", "local", "transformer_engine"],
        help="layer linears / norms (precision.transformer_impl; auto: TE when installed on CUDA)",
    )
    p.add_argument(
        "--fp8", default=None, choices=["hybrid", "e4m3"], help="FP8 (needs Transformer Engine)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--recompute", default=None, choices=["selective", "full"])
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile the transformer layers (compile.enable; default backend inductor); "
        "compilation happens in the warmup steps",
    )
    p.add_argument(
        "--optimizer-implementation",
        default="fused",
        choices=ADAM_IMPLEMENTATIONS,
        help="torch AdamW's optim.implementation when megatron-core falls back to it (no TE / "
        "apex, whose FusedAdam is always fused)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: by GPU name)")
    p.add_argument(
        "--compare",
        choices=["hf"],
        default=None,
        help="also time the official-style HF model (world size 1) and print the ratio",
    )
    p.add_argument(
        "--attention-only",
        action="store_true",
        help="time the attention back-ends on the Gemma-2 attention shapes instead",
    )
    p.add_argument(
        "--attention-model",
        default=None,
        choices=["2b", "9b", "tiny"],
        help="attention shapes (default: 2b on CUDA, tiny elsewhere)",
    )
    p.add_argument("--attention-batch", type=int, default=None)
    p.add_argument(
        "--attention-backends",
        nargs="+",
        default=None,
        help="back-ends to time (default: every one usable on CUDA; math on CPU, "
        "where flex compiles slowly and has no backward)",
    )
    p.add_argument(
        "--lengths",
        default=None,
        help="draw sample lengths: 'official' (the paper's token statistics), a dataset "
        "directory / manifest.json, or KEY=P/T,... per-key means; --prompt-tokens / "
        "--target-tokens are then the crop lengths (default: every sample full length)",
    )
    p.add_argument("--sigma", type=float, default=0.5, help="log-normal spread of --lengths")
    p.add_argument(
        "--text-only-translations",
        action="store_true",
        help="with --lengths: translations carry no image (default: every sample has one)",
    )
    p.add_argument(
        "--packing",
        choices=["off", "on", "both"],
        default="off",
        help="pack samples into rows as data.packing=true (micro-batch size then counts rows); "
        "'both' runs padded and packed and prints the samples/s ratio",
    )
    p.add_argument(
        "--pack-rows",
        default=None,
        help="packed row lengths ENCxDEC (default: the trainer's automatic rows)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the timed steps, profile one more step (torch.profiler): GPU busy time, "
        "kernel launches, host syncs, top operators; printed and in the JSON",
    )
    p.add_argument(
        "--profile-trace",
        default=None,
        help="also write that step's gzipped Chrome trace here (implies --profile)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def _attention_main(args) -> int:
    import torch

    from mmcap.bench.attention_bench import attention_cases, run_attention_benchmark
    from mmcap.bench.report import attention_table, environment, write_json

    cuda = torch.cuda.is_available()
    model = args.attention_model or ("2b" if cuda else "tiny")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    if not cuda:
        dtype = torch.float32  # CPU back-ends are timed in fp32 (no bf16 flex backward anyway)
    batch = args.attention_batch or (8 if cuda else 1)
    encoder = args.prompt_tokens + (50 if model != "tiny" else 8)  # 224 px image tokens
    cases = attention_cases(model, batch, args.target_tokens, encoder)
    backends = args.attention_backends or (None if cuda else ["math"])
    rows = run_attention_benchmark(cases, "cuda" if cuda else "cpu", dtype, backends=backends)
    print(attention_table(rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "attention": rows})
    return 0


def _pack_rows(text: str | None) -> tuple[int, int] | None:
    from mmcap.config import ConfigError

    if text is None:
        return None
    try:
        e, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--pack-rows {text!r}: expected ENCxDEC, e.g. 360x184") from None
    return e, d


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings(
        "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not"
    )
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)
    if args.attention_only:
        return _attention_main(args)

    import torch.distributed as dist

    from mmcap.bench.report import environment, throughput_table, write_json
    from mmcap.bench.train_bench import BenchConfig, check_layout, run_mmcap_benchmark
    from mmcap.config import ConfigError
    from mmcap.parallel import init_process_group

    try:
        b = BenchConfig(
            preset=args.preset,
            tp=args.tp,
            pp=args.pp,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            num_microbatches=args.num_microbatches,
            image_size=args.image_size,
            prompt_tokens=args.prompt_tokens,
            target_tokens=args.target_tokens,
            precision=args.precision,
            transformer_impl=args.transformer_impl,
            fp8=args.fp8,
            compile=args.compile,
            steps=args.steps,
            warmup=args.warmup,
            recompute=args.recompute,
            peak_tflops=args.peak_tflops,
            lengths=args.lengths,
            sigma=args.sigma,
            text_only_translations=args.text_only_translations,
            packing=args.packing == "on",
            pack_rows=_pack_rows(args.pack_rows),
            profile=args.profile,
            profile_trace=args.profile_trace,
            optimizer_implementation=args.optimizer_implementation,
        )
        init_process_group()
        check_layout(b)
        if args.compare and dist.get_world_size() != 1:
            raise ConfigError(
                "--compare hf: the official-style model runs in one process; "
                "launch without torchrun (world size 1)"
            )
        if args.compare and (args.packing != "off" or args.lengths):
            raise ConfigError("--compare hf runs fixed lengths, padded: drop --packing / --lengths")
        results = [run_mmcap_benchmark(b)]
        if args.packing == "both":
            import dataclasses

            packed = run_mmcap_benchmark(dataclasses.replace(b, packing=True))
            packed["impl"] = "mmcap-packed"
            results.append(packed)
    except ConfigError as e:
        print(f"benchmark: configuration error: {e}", file=sys.stderr)
        return 2
    if args.compare == "hf":
        from mmcap.bench.hf_reference import run_hf_benchmark
        from mmcap.bench.train_bench import build_bench_train_config

        model_cfg = build_bench_train_config(b, 1).model_config()
        mm = results[0]
        results.append(
            run_hf_benchmark(b, model_cfg, mm["num_microbatches"], mm["peak_tflops_per_gpu"])
        )
    rank_last = dist.get_rank() == dist.get_world_size() - 1
    if rank_last:
        lengths = (
            f"prompt {b.prompt_tokens} / target {b.target_tokens} tokens"
            if b.lengths is None
            else f"lengths '{b.lengths}' cropped to {b.prompt_tokens} / {b.target_tokens} (mean "
            f"{results[0]['mean_prompt_tokens']:.1f} / {results[0]['mean_target_tokens']:.1f})"
        )
        print(
            f"{args.preset}: {results[0]['image_size']} px, {lengths}, {b.precision}, layout "
            f"{results[0]['layout']}, global batch {results[0]['global_batch_size']}, "
            f"{b.steps} timed steps"
        )
        print(throughput_table(results))
        for r in results:
            if "profile_per_rank" in r:
                from mmcap.bench.profile import profile_table

                print(f"{r['impl']} (rank {dist.get_rank()}): "
                      + profile_table(r["profile_per_rank"][dist.get_rank()]))  # fmt: skip
        if args.json:
            payload = {"environment": environment(), "config": b.__dict__, "results": results}
            if len(results) == 2 and results[1]["impl"] == "mmcap-packed":
                payload["ratio_packed_over_padded_samples_per_s"] = (
                    results[1]["samples_per_s"] / results[0]["samples_per_s"]
                )
            elif len(results) == 2:
                payload["ratio_mmcap_over_official"] = (
                    results[1]["step_time_s"] / results[0]["step_time_s"]
                )
            write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
