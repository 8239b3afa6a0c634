"""Optimizer-step benchmark on a preset's trainable parameters (issue 13 item 6): torch's AdamW
fused / foreach / for-loop (``optim.implementation``), and megatron-core's Python-loop
grad-norm / clip-scale fallbacks (no apex / TE) against :mod:`mmcap.parallel.multi_tensor`.

The tensors are what megatron-core's distributed optimizer steps at DP=1: one flat float32
main parameter per trainable parameter (its numel from the meta-built model), float32
gradients. Each row: median milliseconds per call (CUDA-synchronised), the peak memory the
call allocates above what it starts with (CUDA only), and, for Adam, the largest difference of
the updated parameters from the for-loop implementation (the same update, reordered float32
arithmetic). The grad norm is read on the host after each call, as megatron-core reads it.
"""

from __future__ import annotations

import statistics
import time

import torch

from mmcap.parallel import cuda_factories_on_cpu

__all__ = ["optimizer_table", "run_optimizer_benchmark", "trainable_numels"]


def trainable_numels(preset: str) -> list[int]:
    """Element counts of the trainable parameters of ``preset`` at TP=PP=1 (meta build;
    megatron-core's groups must be initialised at TP=PP=1)."""
    from mmcap.config import get_preset
    from mmcap.train.memory import _param_table

    return [numel for _, numel, _, trainable in _param_table(get_preset(preset)) if trainable]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, steps: int, warmup: int) -> dict:
    times, peak = [], None
    for i in range(warmup + steps):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = max(peak or 0.0, (torch.cuda.max_memory_allocated() - base) / 2**20)
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak}


def _tensors(numels, device, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(n, generator=g, device=device) * scale for n in numels]


def _adam_rows(numels, device, steps, warmup) -> list[dict]:
    rows, reference = [], None
    for impl in ("for-loop", "fused", "foreach"):  # for-loop first: the reference update
        params = [torch.nn.Parameter(t) for t in _tensors(numels, device, seed=0)]
        for p, grad in zip(params, _tensors(numels, device, seed=1, scale=1e-3)):
            p.grad = grad
        opt = torch.optim.AdamW(
            params,
            lr=1e-4,
            weight_decay=0.01,
            fused=impl == "fused",
            foreach=impl == "foreach",
        )
        row = {"kind": "adamw", "impl": impl, **_timed(opt.step, device, steps, warmup)}
        flat = torch.cat([p.detach().flatten() for p in params])
        if reference is None:
            reference = flat
        row["max_abs_diff_vs_for_loop"] = (flat - reference).abs().max().item()
        rows.append(row)
        del params, opt, flat
    return rows


def _norm_and_scale_rows(numels, device, steps, warmup) -> list[dict]:
    from megatron.core import utils as mcore_utils

    from mmcap.parallel.multi_tensor import foreach_l2_norm, foreach_scale

    grads = _tensors(numels, device, seed=2)
    rows = []
    norms = {}
    for impl, fn in (
        ("megatron_local", mcore_utils.local_multi_tensor_l2_norm),
        ("mmcap_foreach", foreach_l2_norm),
    ):

        def call(fn=fn, impl=impl):
            with cuda_factories_on_cpu():
                norms[impl] = fn(2048 * 32, None, [grads], False)[0].item()

        rows.append({"kind": "grad_norm", "impl": impl, **_timed(call, device, steps, warmup)})
    for row in rows:
        row["value"] = norms[row["impl"]]
    for impl, fn in (
        ("megatron_local", mcore_utils.local_multi_tensor_scale),
        ("mmcap_foreach", foreach_scale),
    ):
        def scale(fn=fn):
            fn(2048 * 32, None, [grads, grads], 0.999)

        res = _timed(scale, device, steps, warmup)
        rows.append({"kind": "clip_scale", "impl": impl, **res})
    return rows


def run_optimizer_benchmark(
    preset: str, device: torch.device, steps: int = 5, warmup: int = 1
) -> dict:
    """Every row for ``preset``'s trainable parameters on ``device``."""
    numels = trainable_numels(preset)
    rows = _adam_rows(numels, device, steps, warmup)
    rows += _norm_and_scale_rows(numels, device, steps, warmup)
    return {
        "preset": preset,
        "tensors": len(numels),
        "trainable_params": sum(numels),
        "device": str(device),
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
    }


def optimizer_table(result: dict) -> str:
    """The rows as a fixed-width table."""
    head = (
        f"{result['preset']}: {result['tensors']} trainable tensors, "
        f"{result['trainable_params']:,} parameters, {result['device']}"
    )
    lines = [head, f"{'kind':12s} {'impl':16s} {'ms':>10s} {'peak MiB':>10s}  note"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        note = ""
        if "max_abs_diff_vs_for_loop" in r:
            note = f"max |diff| vs for-loop {r['max_abs_diff_vs_for_loop']:.2e}"
        elif "value" in r:
            note = f"norm {r['value']:.6g}"
        lines.append(f"{r['kind']:12s} {r['impl']:16s} {r['ms']:10.3f} {peak:>10s}  {note}")
    return "\n".join(lines)
