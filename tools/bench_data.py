#!/usr/bin/env python
"""Data-pipeline throughput: token batches (sampling + assembly) and image decoding.

    python tools/bench_data.py [--dataset DIR] [--json out.json]

Token batches run on one CPU core (torch/numpy threads = 1) from an indexed dataset (a
synthetic one of random ids unless --dataset is given): the task-language sampler over the
7 pretraining keys, global batch 1024, padded to 128/128. Images: PIL decode + bicubic resize +
normalise per core at 224 and 768 px; DALI's CPU pipeline at 768 px (one thread and every core)
where nvidia-dali is installed; on a CUDA machine also the torchvision (nvjpeg) and DALI
back-ends at 768 px with their maximum difference from PIL. Prints a table, writes JSON.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def _rate(fn, n_items: int, min_seconds: float) -> float:
    """Items per second of fn() (which handles n_items), repeated for at least min_seconds."""
    fn()  # warm-up
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += n_items
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return done / dt


def bench_tokens(path, global_batch: int, seconds: float) -> dict:
    from mmcap.data.config import BatchConfig, SamplerConfig
    from mmcap.data.indexed import CaptionDataset
    from mmcap.data.loader import TokenBatchAssembler
    from mmcap.data.sampler import GroupIndex, TaskLangSampler

    ds = CaptionDataset(path)
    sampler = TaskLangSampler(
        [GroupIndex.from_dataset(ds)], SamplerConfig(global_batch_size=global_batch)
    )
    assemble = TokenBatchAssembler([ds], BatchConfig(max_prompt_tokens=128, max_target_tokens=128))
    batches = [sampler.next_batch() for _ in range(8)]
    return {
        "sampling_samples_per_s": _rate(sampler.next_batch, global_batch, seconds),
        "assembly_samples_per_s": _rate(
            lambda: [assemble(b) for b in batches], 8 * global_batch, seconds
        ),
        "total_samples_per_s": _rate(lambda: assemble(sampler.next_batch()), global_batch, seconds),
        "entries": len(ds),
        "groups": ds.num_groups,
    }


def bench_images(jpegs: list[bytes], seconds: float, gpu: bool) -> dict:
    import torch

    from mmcap.data.config import ImageConfig
    from mmcap.data.images import HAVE_DALI, available_backends, build_image_decoder

    out = {}
    for size in (224, 768):
        dec = build_image_decoder(ImageConfig(size=size, backend="pil"))
        out[f"pil_{size}_images_per_s_per_core"] = _rate(lambda d=dec: d(jpegs[:16]), 16, seconds)
    if HAVE_DALI:  # the CPU pipeline, on one thread (per core, as PIL) and on every core
        ref = build_image_decoder(ImageConfig(size=768, backend="pil"))(jpegs)
        cores = len(os.sched_getaffinity(0))
        for threads, label in ((1, "per_core"), (cores, f"{cores}_threads")):
            cfg = ImageConfig(size=768, backend="dali", dali_device="cpu", device="cpu")
            dec = build_image_decoder(cfg, max_batch_size=len(jpegs), num_threads=threads)
            rate = _rate(lambda d=dec: d(jpegs), len(jpegs), seconds)
            out[f"dali_cpu_768_images_per_s_{label}"] = rate
        diff = (dec(jpegs) - ref).abs()
        out["dali_cpu_768_max_abs_diff_vs_pil"] = diff.max().item()
        out["dali_cpu_768_mean_abs_diff_vs_pil"] = diff.mean().item()
    if gpu:
        ref = build_image_decoder(ImageConfig(size=768, backend="pil"))(jpegs)
        for name in available_backends()[1:]:
            dec = build_image_decoder(ImageConfig(size=768, backend=name))

            def run(d=dec):
                d(jpegs)
                torch.cuda.synchronize()

            out[f"{name}_768_images_per_s"] = _rate(run, len(jpegs), seconds)
            diff = (dec(jpegs).cpu() - ref).abs()
            out[f"{name}_768_max_abs_diff_vs_pil"] = diff.max().item()
            out[f"{name}_768_mean_abs_diff_vs_pil"] = diff.mean().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", help="indexed dataset directory (default: synthetic)")
    ap.add_argument("--groups", type=int, default=50_000, help="images in the synthetic dataset")
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--image-size", type=int, nargs=2, default=(640, 480), help="test JPEG w h")
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one core, as the targets are stated
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mmcap.data.testing import make_jpeg, write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dataset or write_synthetic_dataset(os.path.join(tmp, "syn"), args.groups)
        tokens = bench_tokens(path, args.global_batch, args.seconds)
    jpegs = [make_jpeg(i, tuple(args.image_size), quality=90) for i in range(args.gpu_batch)]
    images = bench_images(jpegs, args.seconds, gpu=torch.cuda.is_available())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "date": time.strftime("%Y-%m-%d"),
        "global_batch": args.global_batch,
        "jpeg_size": list(args.image_size),
        "jpeg_bytes_mean": sum(map(len, jpegs)) / len(jpegs),
        **{f"tokens_{k}": v for k, v in tokens.items()},
        **images,
    }
    print(f"{'measurement':<44} {'value':>14}")
    for k, v in result.items():
        if isinstance(v, float):  # rates with one decimal; differences (< 1) with 3 digits
            print(f"{k:<44} {v:>14,.1f}" if abs(v) >= 1 else f"{k:<44} {v:>14.3g}")
        else:
            print(f"{k:<44} {v!s:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
