"""Synthetic training batches for the benchmark: fixed lengths, or lengths drawn from a
:class:`mmcap.bench.lengths.LengthModel`, padded as the trainer pads a local batch or packed
as ``data.packing=true`` packs it (same collate, packer and micro-batch split as the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmcap.bench.lengths import LengthModel
from mmcap.data.collate import collate_tokens
from mmcap.data.config import BatchConfig
from mmcap.data.packing import auto_row_lengths, pack_batch
from mmcap.model.stage_io import split_microbatches, split_packed_microbatches


@dataclass
class SyntheticBatch:
    """This rank's micro-batches and the GLOBAL batch's real counts (every rank draws the whole
    global batch from the seed and keeps its slice, as the sampler does)."""

    microbatches: list
    prompt_lengths: np.ndarray  # global batch, real lengths
    target_lengths: np.ndarray
    has_image: np.ndarray
    rows: tuple[int, int] | None  # packed row lengths (encoder, decoder)
    local_rows: int  # padded: samples; packed: rows (this rank)
    useful: tuple[float, float]  # (encoder, decoder) useful-token fraction, this rank


def length_model(spec: str, sigma: float, text_only_translations: bool) -> LengthModel:
    """``official`` | a dataset directory / manifest.json | ``KEY=P/T,...`` means."""
    if spec == "official":
        return LengthModel.official(sigma, text_only_translations)
    if "=" in spec:
        return LengthModel.from_means(spec, sigma)
    return LengthModel.from_manifest(spec, sigma, text_only_translations)


def synthetic_batch(
    model_cfg,
    *,
    global_batch: int,
    dp: int,
    dp_rank: int,
    micro_batch_size: int,
    prompt_tokens: int,
    target_tokens: int,
    lengths: str | None = None,
    sigma: float = 0.5,
    text_only_translations: bool = False,
    packing: bool = False,
    rows: tuple[int, int] | None = None,
    device="cpu",
    seed: int = 0,
    pipeline_parallel: int = 1,
) -> SyntheticBatch:
    """Random ids and images. ``lengths`` None: every sample ``prompt_tokens`` /
    ``target_tokens`` long with an image; else drawn from the length model and cropped to
    them. ``packing``: rows of ``rows`` (default the trainer's automatic rows for the drawn
    lengths), micro-batches of ``micro_batch_size`` rows (the trainer's rule: whole
    micro-batches under pipeline parallelism, a smaller last one without)."""
    n_img = model_cfg.vision.num_image_tokens
    if lengths is None:
        p = np.full(global_batch, prompt_tokens)
        t = np.full(global_batch, target_tokens)
        img = np.ones(global_batch, bool)
    else:
        s = length_model(lengths, sigma, text_only_translations).sample(
            global_batch, seed=seed, max_prompt=prompt_tokens, max_target=target_tokens
        )
        p, t, img = s["prompt"], s["target"], s["has_image"]
    per = global_batch // dp
    sl = slice(dp_rank * per, (dp_rank + 1) * per)
    rng = np.random.default_rng(seed + 1 + dp_rank)
    v_enc, v_dec = model_cfg.encoder.vocab_size, model_cfg.decoder.vocab_size
    prompts = [rng.integers(3, v_enc, n) for n in p[sl]]
    targets = [rng.integers(3, v_dec, n) for n in t[sl]]
    cfg = BatchConfig(max_prompt_tokens=prompt_tokens, max_target_tokens=target_tokens)
    tokens = collate_tokens(prompts, targets, cfg)
    size = model_cfg.vision.image_size
    g = torch.Generator().manual_seed(seed + dp_rank)
    pixels = torch.randn(per, 3, size, size, generator=g)
    key = np.zeros(per, np.int64)
    local_img = img[sl]
    enc_tokens = int(p[sl].sum() + n_img * local_img.sum())
    if not packing:
        mbs = split_microbatches(
            tokens,
            micro_batch_size,
            num_image_tokens=n_img,
            has_image=torch.from_numpy(local_img),
            pixels=pixels,
            device=device,
        )
        lp, lt = tokens.encoder_input_ids.shape[1], tokens.decoder_input_ids.shape[1]
        useful = (enc_tokens / (per * lp + n_img * local_img.sum()), t[sl].sum() / (per * lt))
        return SyntheticBatch(mbs, p, t, img, None, per, useful)
    if rows is None:
        enc_mean = float(p.mean() + n_img * img.mean())
        rows = auto_row_lengths(enc_mean, float(t.mean()), n_img + prompt_tokens, target_tokens)
    packed = pack_batch(
        tokens,
        local_img,
        key,
        num_image_tokens=n_img,
        enc_row=rows[0],
        dec_row=rows[1],
        cfg=cfg,
        row_multiple=1 if pipeline_parallel == 1 else micro_batch_size,
    )
    mbs = split_packed_microbatches(
        packed,
        micro_batch_size,
        num_image_tokens=n_img,
        pixels=pixels,
        device=device,
        allow_partial=pipeline_parallel == 1,
    )
    r = packed.num_rows
    useful = (enc_tokens / (r * rows[0]), t[sl].sum() / (r * rows[1]))
    return SyntheticBatch(mbs, p, t, img, rows, r, useful)
