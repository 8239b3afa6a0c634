"""Tiny random batches for sequence-packing tests: the same samples padded and packed, and the
per-sample losses of both layouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmcap.data.collate import TokenBatch, collate_tokens
from mmcap.data.config import BatchConfig
from mmcap.data.packing import PackedRows, pack_batch
from mmcap.model.stage_io import MicroBatch, split_microbatches, split_packed_microbatches


@dataclass
class Samples:
    tokens: TokenBatch
    has_image: np.ndarray  # bool [B]
    key: np.ndarray  # [B]
    pixels: torch.Tensor  # [B, 3, S, S], zeros where no image


def random_samples(
    model_cfg, n: int = 9, *, seed: int = 0, max_prompt: int = 12, max_target: int = 14
) -> Samples:
    """``n`` samples of random lengths (at least 2 tokens a side), every third without image."""
    rng = np.random.default_rng(seed)
    v_enc, v_dec = model_cfg.encoder.vocab_size, model_cfg.decoder.vocab_size
    prompts = [rng.integers(3, v_enc, rng.integers(2, max_prompt + 1)) for _ in range(n)]
    targets = [rng.integers(3, v_dec, rng.integers(2, max_target + 1)) for _ in range(n)]
    cfg = BatchConfig(max_prompt_tokens=max_prompt, max_target_tokens=max_target, pad_multiple=1)
    tokens = collate_tokens(prompts, targets, cfg)
    has_image = np.arange(n) % 3 != 1
    s = model_cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, s, s, generator=g) * torch.from_numpy(has_image)[:, None, None, None]
    key = rng.integers(0, 7, n)
    return Samples(tokens, has_image, key, pixels)


def pack(samples: Samples, model_cfg, *, enc_row: int, dec_row: int, rows_per_mb: int = 1):
    """(PackedRows, micro-batches of ``rows_per_mb`` rows) of the samples."""
    cfg = BatchConfig(pad_multiple=1)
    rows = pack_batch(
        samples.tokens,
        samples.has_image,
        samples.key,
        num_image_tokens=model_cfg.vision.num_image_tokens,
        enc_row=enc_row,
        dec_row=dec_row,
        cfg=cfg,
        row_multiple=rows_per_mb,
    )
    mbs = split_packed_microbatches(
        rows,
        rows_per_mb,
        num_image_tokens=model_cfg.vision.num_image_tokens,
        pixels=samples.pixels,
    )
    return rows, mbs


def padded_microbatches(samples: Samples, model_cfg, micro_batch_size: int) -> list[MicroBatch]:
    return split_microbatches(
        samples.tokens,
        micro_batch_size,
        num_image_tokens=model_cfg.vision.num_image_tokens,
        has_image=torch.from_numpy(samples.has_image),
        pixels=samples.pixels,
        key=torch.from_numpy(samples.key),
    )


def per_sample_from_packed(rows: PackedRows, token_loss: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample summed loss [n] from the per-token loss of packed rows [R, S_dec]."""
    out = token_loss.new_zeros(n)
    doc = torch.from_numpy(rows.decoder_doc)
    for r, members in enumerate(rows.rows):
        for d, i in enumerate(members):
            out[i] = out[i] + token_loss[r][doc[r] == d].sum()
    return out


def run_microbatch(model, mb: MicroBatch, labels: bool = True) -> torch.Tensor:
    """One single-stage forward of ``mb`` (per-token loss with labels, else logits)."""
    return model(
        mb.prompt_ids,
        mb.decoder_input_ids,
        mb.prompt_mask,
        pixel_values=mb.pixel_values,
        image_tokens=mb.image_tokens,
        labels=mb.labels if labels else None,
        encoder_mask=mb.encoder_mask,
        has_image=mb.has_image,
        packed=mb.packed,
    )
