"""Padded encoder/decoder token batches for the model (no packing).

For entry ``i`` with prompt ids ``p`` (BART, ``<s> ... </s>``) and target ids ``t``
(Gemma, ``<bos> ... <eos>``), cropped to the configured lengths as the official loader does
(``p[:Lp]``; with ``keep_eos_on_crop`` a cropped sequence ends in its own last token instead,
``p[:Lp - 1] + p[-1:]``, as the official CE eval's tokenizer truncation):

- ``encoder_input_ids[i]  = p[:Lp]`` padded with BART ``<pad>`` (1), mask True on tokens;
- ``labels[i]            = t[:Lt]`` padded with ``ignore_index`` (-100);
- ``decoder_input_ids[i] = [start=1] + t[:Lt - 1]`` (labels shifted right, BART's
  ``shift_tokens_right`` with decoder_start_token_id 1), padded with Gemma ``<pad>`` (0);
- ``decoder_attention_mask[i]`` True where ``labels`` is not padding.

Packing several samples into one row is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from mmcap.data.config import BatchConfig


@dataclass
class TokenBatch:
    """Shapes: encoder tensors [B, Lp], decoder tensors and labels [B, Lt]; ids int64."""

    encoder_input_ids: torch.Tensor
    encoder_attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> TokenBatch:
        return TokenBatch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def padded_length(longest: int, cap: int, cfg: BatchConfig) -> int:
    """Padded length of a batch whose longest (cropped) sequence has ``longest`` tokens."""
    if cfg.pad_to == "max":
        return cap
    m = cfg.pad_multiple
    return min(cap, -(-max(longest, 1) // m) * m)  # round up to the multiple, crop to the cap


def _crop(ids: np.ndarray, n: int, cfg: BatchConfig) -> np.ndarray:
    if len(ids) <= n or not cfg.keep_eos_on_crop:
        return ids[:n]
    return np.concatenate([ids[: n - 1], ids[-1:]])


def collate_tokens(
    prompts: list[np.ndarray], targets: list[np.ndarray], cfg: BatchConfig
) -> TokenBatch:
    """Pad and shift one batch of (prompt ids, target ids); see the module docstring."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    b = len(prompts)
    p_len = [min(len(p), cfg.max_prompt_tokens) for p in prompts]
    t_len = [min(len(t), cfg.max_target_tokens) for t in targets]
    lp = padded_length(max(p_len, default=1), cfg.max_prompt_tokens, cfg)
    lt = padded_length(max(t_len, default=1), cfg.max_target_tokens, cfg)
    enc = np.full((b, lp), cfg.encoder_pad_id, dtype=np.int64)
    labels = np.full((b, lt), cfg.ignore_index, dtype=np.int64)
    dec = np.full((b, lt), cfg.decoder_pad_id, dtype=np.int64)
    dec[:, 0] = cfg.decoder_start_id
    for i in range(b):
        n, m = p_len[i], t_len[i]
        p, t = _crop(prompts[i], n, cfg), _crop(targets[i], m, cfg)
        enc[i, :n] = p
        labels[i, :m] = t
        dec[i, 1:m] = t[: m - 1]
    p_len_a, t_len_a = np.asarray(p_len), np.asarray(t_len)
    enc_mask = np.arange(lp)[None, :] < p_len_a[:, None]
    dec_mask = np.arange(lt)[None, :] < t_len_a[:, None]
    return TokenBatch(
        torch.from_numpy(enc),
        torch.from_numpy(enc_mask),
        torch.from_numpy(dec),
        torch.from_numpy(dec_mask),
        torch.from_numpy(labels),
    )


def collate_tokens_ref(
    prompts: list[list[int]], targets: list[list[int]], cfg: BatchConfig
) -> dict:
    """Plain-Python reference of :func:`collate_tokens` (lists of lists), for tests."""
    def crop(x, n):
        x = list(x)
        return x[: n - 1] + x[-1:] if cfg.keep_eos_on_crop and len(x) > n else x[:n]

    p = [crop(x, cfg.max_prompt_tokens) for x in prompts]
    t = [crop(x, cfg.max_target_tokens) for x in targets]
    lp = padded_length(max(map(len, p), default=1), cfg.max_prompt_tokens, cfg)
    lt = padded_length(max(map(len, t), default=1), cfg.max_target_tokens, cfg)
    shifted = [[cfg.decoder_start_id] + x[:-1] if x else [cfg.decoder_start_id] for x in t]
    return {
        "encoder_input_ids": [x + [cfg.encoder_pad_id] * (lp - len(x)) for x in p],
        "encoder_attention_mask": [[True] * len(x) + [False] * (lp - len(x)) for x in p],
        "decoder_input_ids": [x + [cfg.decoder_pad_id] * (lt - len(x)) for x in shifted],
        "decoder_attention_mask": [[True] * len(x) + [False] * (lt - len(x)) for x in t],
        "labels": [x + [cfg.ignore_index] * (lt - len(x)) for x in t],
    }
