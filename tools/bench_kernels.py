"""Benchmark mmcap's fused kernels on a GPU: time (forward + backward) and peak memory.

Fused soft-capped linear cross-entropy at 8,192 tokens x d 2,304 / 3,584 x vocab 256,000
(Gemma-2 2B / 9B, TP=1, cap 30) and d 1,024 x vocab 257,024 (Florence, no cap), both gradient
strategies (``mmcap_fused``: gradients in the forward, 3 GEMMs, the default;
``mmcap_recompute``: the backward recomputes the logits, 4 GEMMs), against the
unfused torch path the model used before (logits -> soft-cap -> float32 CE), torch.compile of
it, and Liger's fused linear CE / Cut Cross-Entropy when installed; RMSNorm(1+w) and GeGLU
against torch eager and torch.compile. Prints a table and writes JSON (``--out``).

Without CUDA it exits with a message; ``--tiny`` then runs tiny shapes on the CPU (the
reference paths only) to exercise the script.

    python tools/bench_kernels.py --out bench_kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from mmcap.ops.geglu import geglu, geglu_ref
from mmcap.ops.kernels import load_extension
from mmcap.ops.rmsnorm import rmsnorm, rmsnorm_ref
from mmcap.ops.softcap_ce import IGNORE_INDEX, softcap_ce

CE_SHAPES = [  # (name, tokens, d, vocab, cap)
    ("gemma2-2b", 8192, 2304, 256000, 30.0),
    ("gemma2-9b", 8192, 3584, 256000, 30.0),
    ("florence", 8192, 1024, 257024, None),
]
NORM_SHAPES = [("d1024", 8192, 1024), ("d2304", 8192, 2304), ("d3584", 8192, 3584)]
GEGLU_SHAPES = [("2b-ffn9216", 8192, 9216), ("9b-ffn14336", 8192, 14336)]
TINY = {"ce": [("tiny", 64, 32, 1000, 30.0)], "norm": [("tiny", 64, 64)],
        "geglu": [("tiny", 64, 64)]}  # fmt: skip


def unfused_ce(h, w, labels, cap):
    """The model's loss before the fused op: full logits in the input dtype, soft-cap, CE."""
    z = h @ w.t()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.float(), labels, reduction="none", ignore_index=IGNORE_INDEX)


def ce_candidates(compile_: bool) -> dict:
    out = {
        "mmcap_fused": lambda h, w, y, cap: softcap_ce(h, w, y, cap=cap, grad_strategy="forward"),
        "mmcap_recompute": lambda h, w, y, cap: softcap_ce(
            h, w, y, cap=cap, grad_strategy="recompute"
        ),
        "torch_unfused": unfused_ce,
    }
    if compile_:
        out["torch_compile"] = torch.compile(unfused_ce)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        def liger(h, w, y, cap):
            loss = LigerFusedLinearCrossEntropyLoss(softcap=cap, reduction="sum")
            return loss(w, h, y)

        out["liger_flce"] = liger
    except ImportError:
        print("bench_kernels: liger-kernel not installed: no Liger row", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - an optional baseline must not stop the benchmark
        print(f"bench_kernels: liger-kernel failed to import ({type(e).__name__}: {e}): no "
              "Liger row", file=sys.stderr)  # fmt: skip
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cut_ce"] = lambda h, w, y, cap: linear_cross_entropy(
            h, w, y, softcap=cap, reduction="none"
        )
    except ImportError:
        print("bench_kernels: cut-cross-entropy not installed: no CCE row", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - an optional baseline must not stop the benchmark
        print(f"bench_kernels: cut-cross-entropy failed to import ({type(e).__name__}: {e}): "
              "no CCE row", file=sys.stderr)  # fmt: skip
    return out


def measure(fn, make_inputs, device, iters: int, warmup: int) -> dict:
    """Median seconds of forward + backward and peak memory above the inputs."""
    inputs = make_inputs()
    times = []
    for i in range(warmup + iters):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn(*leaves)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del out, leaves
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return {"ms": 1e3 * sorted(times)[len(times) // 2], "peak_mib": peak and peak / 2**20}


def run(args, on_row=None) -> list[dict]:
    """Every row, each also passed to ``on_row(rows)`` as soon as it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = device.type == "cpu"
    rows = []

    def record(kind, shape, impl, fn, make):
        try:
            res = measure(fn, make, device, args.iters, args.warmup)
        except Exception as e:  # noqa: BLE001 - a failing optional baseline must not hide the rest
            res = {"ms": None, "peak_mib": None, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append({"kind": kind, "shape": shape, "impl": impl, **res})
        print(_fmt(rows[-1]), flush=True)
        if on_row is not None:
            on_row(rows)

    for name, n, d, v, cap in TINY["ce"] if tiny else CE_SHAPES:

        def make(n=n, d=d, v=v):
            g = torch.Generator(device).manual_seed(0)
            h = torch.randn(n, d, device=device, generator=g).to(dtype)
            w = (torch.randn(v, d, device=device, generator=g) * 0.02).to(dtype)
            return h, w, torch.randint(0, v, (n,), device=device, generator=g)

        for impl, fn in ce_candidates(args.compile).items():
            record("softcap_ce", f"{name} {n}x{d}x{v} cap={cap}", impl,
                   lambda h, w, y, fn=fn, cap=cap: fn(h, w, y, cap), make)  # fmt: skip
    for name, n, d in TINY["norm"] if tiny else NORM_SHAPES:

        def make(n=n, d=d):
            return torch.randn(n, d, device=device, dtype=dtype), torch.zeros(d, device=device,
                                                                            dtype=dtype)  # fmt: skip

        impls = {"mmcap": lambda x, w: rmsnorm(x, w, 1e-6),
                 "torch_eager": lambda x, w: rmsnorm_ref(x, w, 1e-6)}  # fmt: skip
        if args.compile:
            impls["torch_compile"] = torch.compile(lambda x, w: rmsnorm_ref(x, w, 1e-6))
        for impl, fn in impls.items():
            record("rmsnorm", f"{name} {n}x{d}", impl, fn, make)
    for name, n, f in TINY["geglu"] if tiny else GEGLU_SHAPES:

        def make(n=n, f=f):
            return (torch.randn(n, 2 * f, device=device, dtype=dtype),)

        impls = {"mmcap": geglu, "torch_eager": geglu_ref}
        if args.compile:
            impls["torch_compile"] = torch.compile(geglu_ref)
        for impl, fn in impls.items():
            record("geglu", f"{name} {n}x2*{f}", impl, fn, make)
    return rows


def _fmt(r: dict) -> str:
    ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
    mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
    tail = f"  ({r['error']})" if r.get("error") else ""
    return f"{r['kind']:<11} {r['shape']:<40} {r['impl']:<16} {ms:>10} {mem:>10}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_kernels.json", help="JSON results file")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile baselines")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="without CUDA: tiny CPU shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_kernels: needs a CUDA GPU (the kernels are CUDA-only); --tiny runs tiny "
              "CPU shapes of the reference paths instead", file=sys.stderr)  # fmt: skip
        return 2
    if torch.cuda.is_available():
        missing = [op for op in ("softcap_ce", "rmsnorm", "geglu") if load_extension(op) is None]
        if missing:
            print(f"bench_kernels: extensions not built for {missing}: 'mmcap' rows time the "
                  "references (pip install -e . with a CUDA toolkit)", file=sys.stderr)  # fmt: skip
    print(f"{'kernel':<11} {'shape':<40} {'impl':<16} {'ms fwd+bwd':>10} {'peak MiB':>10}")
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }

    def save(rows, complete=False):  # after every row: a run cut short keeps what it measured
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": {**meta, "complete": complete}, "results": rows}, f, indent=1)
        os.replace(tmp, args.out)  # atomic

    save(run(args, on_row=save), complete=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
