"""How much of a training step is padding, padded vs packed (``tools/packing_report.py``).

For one global batch drawn from a :class:`mmcap.bench.lengths.LengthModel` (task-language
balanced by default), split over ``dp`` ranks as the trainer splits it:

- **padded** (the trainer without ``data.packing``): each rank's local batch padded to its
  longest prompt / target (rounded up to ``pad_multiple``); samples with an image get the image
  rows, text-only samples of a mixed batch are encoded from their prompt alone;
- **packed** (``data.packing=true``): each rank's samples packed by :func:`mmcap.data.packing.
  plan_rows` into rows of the given lengths.

Per layout: rows, useful-token fraction of the encoder (image + prompt tokens / computed
slots) and decoder (target tokens / slots), and training FLOPs per sample: *model* FLOPs
(:func:`mmcap.train.flops.step_flops` on the real lengths, what MFU counts) and *executed*
FLOPs, what the layout computes: padded = every sample at the padded lengths (attention over
the padded sequences; text-only samples' masked image rows in cross-attention not counted, so
this is a lower bound); packed = the real samples plus the linear layers on the padding slots
(document-masked varlen attention skips padding).
"""

from __future__ import annotations

import functools

import numpy as np

from mmcap.bench.lengths import LengthModel
from mmcap.data.collate import padded_length
from mmcap.data.config import BatchConfig
from mmcap.data.packing import auto_row_lengths, plan_rows
from mmcap.train.flops import step_flops

__all__ = ["layout_stats", "packing_report", "report_markdown"]


def _padded(p, t, img, n_img, cfg: BatchConfig):
    """The trainer's padding of one local batch (:func:`mmcap.data.collate.padded_length`)."""
    lp = padded_length(int(p.max()), cfg.max_prompt_tokens, cfg)
    lt = padded_length(int(t.max()), cfg.max_target_tokens, cfg)
    enc_slots = len(p) * lp + n_img * int(img.sum())
    return len(p), enc_slots, len(p) * lt, (lp, lt)


def layout_stats(
    model_cfg,
    lengths: dict[str, np.ndarray],
    *,
    dp: int,
    layout: str,
    enc_row: int | None = None,
    dec_row: int | None = None,
    pad_multiple: int = 8,
    max_prompt: int = 128,
    max_target: int = 128,
) -> dict:
    """Counts of one layout ("padded" or "packed") over the whole batch (all DP ranks);
    ``max_prompt`` / ``max_target``: the crop lengths (padding never exceeds them)."""
    batch_cfg = BatchConfig(
        max_prompt_tokens=max_prompt, max_target_tokens=max_target, pad_multiple=pad_multiple
    )
    n_img = model_cfg.vision.num_image_tokens
    flops = functools.lru_cache(maxsize=None)(
        lambda p, t, i, att=True: step_flops(model_cfg, p, t, i, attention=att)
    )
    p_all, t_all, img_all = lengths["prompt"], lengths["target"], lengths["has_image"]
    n = len(p_all)
    if n % dp:
        raise ValueError(f"{n} samples do not split over {dp} data-parallel ranks")
    per = n // dp
    rows = enc_slots = dec_slots = 0
    executed = 0.0
    model = sum(flops(int(p), int(t), bool(i)) for p, t, i in zip(p_all, t_all, img_all))
    for r in range(dp):
        sl = slice(r * per, (r + 1) * per)
        p, t, img = p_all[sl], t_all[sl], img_all[sl]
        if layout == "padded":
            k, es, ds, (lp, lt) = _padded(p, t, img, n_img, batch_cfg)
            executed += sum(flops(lp, lt, bool(i)) for i in img)
        elif layout == "packed":
            enc = p + n_img * img
            plan = plan_rows(enc, t, enc_row, dec_row)
            k, es, ds = len(plan), len(plan) * enc_row, len(plan) * dec_row
            executed += sum(flops(int(a), int(b), bool(i)) for a, b, i in zip(p, t, img))
            for members in plan:  # padding slots: linear layers only
                pad_e = enc_row - int(enc[members].sum())
                pad_d = dec_row - int(t[members].sum())
                executed += flops(pad_e, pad_d, False, False)
        else:
            raise ValueError(f"layout must be padded or packed, got {layout!r}")
        rows, enc_slots, dec_slots = rows + k, enc_slots + es, dec_slots + ds
    enc_tokens = int(p_all.sum() + n_img * img_all.sum())
    return {
        "layout": layout if layout == "padded" else f"packed {enc_row}/{dec_row}",
        "rows": rows,
        "useful_encoder": enc_tokens / enc_slots,
        "useful_decoder": int(t_all.sum()) / dec_slots,
        "model_gflops_per_sample": model / n / 1e9,
        "executed_gflops_per_sample": executed / n / 1e9,
    }


def packing_report(
    model_cfg,
    lengths_model: LengthModel,
    *,
    samples: int = 1024,
    dp: int = 8,
    rows: list[tuple[int, int]] | None = None,
    max_prompt: int = 128,
    max_target: int = 128,
    seed: int = 0,
) -> dict:
    """Padded vs packed with each (encoder, decoder) row length pair of ``rows`` (default: rows
    of one longest sample, image tokens + prompt crop / target crop, and the trainer's
    automatic rows, :func:`mmcap.data.packing.auto_row_lengths` of these lengths)."""
    lengths = lengths_model.sample(
        samples, seed=seed, max_prompt=max_prompt, max_target=max_target
    )
    n_img = model_cfg.vision.num_image_tokens
    one = (n_img + max_prompt, max_target)
    enc_mean = float(lengths["prompt"].mean() + n_img * lengths["has_image"].mean())
    auto = auto_row_lengths(enc_mean, float(lengths["target"].mean()), *one)
    crops = dict(max_prompt=max_prompt, max_target=max_target)
    out = [layout_stats(model_cfg, lengths, dp=dp, layout="padded", **crops)]
    for e, d in rows or [one, auto]:
        stats = layout_stats(model_cfg, lengths, dp=dp, layout="packed", enc_row=e, dec_row=d)
        if (e, d) == auto:
            stats["layout"] += " (auto)"
        out.append(stats)
    return {
        "model": model_cfg.name,
        "samples": samples,
        "dp": dp,
        "lengths": lengths_model.source,
        "sigma": lengths_model.sigma,
        "mean_prompt": float(lengths["prompt"].mean()),
        "mean_target": float(lengths["target"].mean()),
        "image_fraction": float(lengths["has_image"].mean()),
        "layouts": out,
    }


def report_markdown(rep: dict) -> str:
    lines = [
        f"{rep['model']}, {rep['samples']} samples over DP={rep['dp']} "
        f"({rep['lengths']}, log-normal sigma {rep['sigma']}; mean prompt "
        f"{rep['mean_prompt']:.1f}, target {rep['mean_target']:.1f}, "
        f"{rep['image_fraction']:.0%} with image)",
        "",
        "| layout (enc/dec row) | rows | useful enc | useful dec | model GFLOP/sample "
        "| executed GFLOP/sample | executed / model |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["layouts"]:
        lines.append(
            f"| {r['layout']} | {r['rows']} | {r['useful_encoder']:.1%} | "
            f"{r['useful_decoder']:.1%} | {r['model_gflops_per_sample']:.1f} | "
            f"{r['executed_gflops_per_sample']:.1f} | "
            f"{r['executed_gflops_per_sample'] / r['model_gflops_per_sample']:.2f} |"
        )
    return "\n".join(lines)
