"""Sequence packing for the encoder-decoder: several samples per row on both sides.

A step's local batch (padded :class:`mmcap.data.collate.TokenBatch`, already cropped to the
configured lengths) is laid out in fixed-length rows: row ``r`` holds documents 0, 1, ... of
a few samples, each sample's encoder part (``image tokens`` when it has an image, then its
prompt) in the encoder row and its decoder part (decoder input and labels) in the decoder
row, at the same document index, then padding. :func:`plan_rows` fills one row at a time
with the samples that best fill both sides (greedy, deterministic); within a row the
documents keep the samples' batch order. The plan is a pure function of the batch, so the
sampler state that determines the batch determines the packing, and exact resume holds.

Every sample of the batch is in the step's rows: ``global_batch_size`` still counts samples,
and a step trains on the same samples (and the same per-token loss) with or without packing.
Positions restart at 0 in every document; the model keeps attention within a document
(:class:`mmcap.model.stage_io.PackedDocs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcap.data.collate import TokenBatch
from mmcap.data.config import BatchConfig


def plan_rows(
    enc_lens: np.ndarray, dec_lens: np.ndarray, enc_row: int, dec_row: int
) -> list[list[int]]:
    """Rows of sample indices (each ascending; rows ordered by their first sample).

    Greedy row filling for the two lengths at once: a row is filled before the next opens, each
    time with the remaining sample that fits both sides and maximises
    ``e/E + d/D - |(free_e - e)/E - (free_d - d)/D|`` (large samples first, keeping the two
    sides' free space balanced so neither fills up while the other is half empty; ties go to
    the lowest index). On task-language balanced batches with the official length statistics
    this fills ~93% of both sides where first-fit decreasing on e + d fills ~89%
    (``tools/packing_report.py``; measured 2026-11-30).

    Args:
        enc_lens / dec_lens: per sample, encoder (image + prompt) and decoder tokens.
        enc_row / dec_row: row lengths; every sample must fit a row on its own.
    """
    enc = np.asarray(enc_lens, np.int64)
    dec = np.asarray(dec_lens, np.int64)
    if len(enc) != len(dec):
        raise ValueError(f"{len(enc)} encoder lengths for {len(dec)} decoder lengths")
    too_long = np.nonzero((enc > enc_row) | (dec > dec_row))[0]
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(
            f"sample {i} ({enc[i]} encoder / {dec[i]} decoder tokens) does not fit a "
            f"packed row of {enc_row} / {dec_row} tokens"
        )
    left = np.arange(len(enc))
    rows: list[list[int]] = []
    while len(left):
        free_e, free_d = enc_row, dec_row  # integers: the fit test is exact
        members = []
        while len(left):
            cand = left[(enc[left] <= free_e) & (dec[left] <= free_d)]
            if not len(cand):
                break
            e, d = enc[cand] / enc_row, dec[cand] / dec_row
            score = e + d - np.abs((free_e / enc_row - e) - (free_d / dec_row - d))
            j = int(cand[np.argmax(score)])  # argmax: first (lowest index) of the ties
            members.append(j)
            free_e -= int(enc[j])
            free_d -= int(dec[j])
            left = left[left != j]
        rows.append(sorted(members))
    rows.sort(key=lambda m: m[0])
    return rows


# Automatic rows hold this many samples on average: measured on task-language balanced batches
# of 1,024 with the official length statistics (tools/packing_report.py, 2026-11-30), 4 gives
# 91% useful tokens on both sides (2: ~85%, 6: 92%); longer rows add little and cost memory.
AUTO_SAMPLES_PER_ROW = 4


def auto_row_lengths(
    enc_mean: float,
    dec_mean: float,
    min_enc: int,
    min_dec: int,
    *,
    dec_multiple: int = 8,
    samples_per_row: float = AUTO_SAMPLES_PER_ROW,
) -> tuple[int, int]:
    """Row lengths that hold ``samples_per_row`` samples of the mean lengths and keep the two
    sides in the data's encoder : decoder ratio (so neither side fills up first), never below
    one longest sample (``min_enc`` / ``min_dec``). Encoder rounded up to 8, decoder to
    ``dec_multiple``."""
    if enc_mean <= 0 or dec_mean <= 0:
        raise ValueError(f"mean lengths must be > 0, got {enc_mean}, {dec_mean}")
    ratio = enc_mean / dec_mean
    dec = max(min_dec, samples_per_row * dec_mean, min_enc / ratio)
    dec = -(-int(np.ceil(dec)) // dec_multiple) * dec_multiple
    enc = max(min_enc, int(np.ceil(dec * ratio)))
    return -(-enc // 8) * 8, dec


@dataclass
class PackedRows:
    """A local batch laid out in packed rows (numpy; int64 unless noted).

    Args:
        encoder_ids / encoder_doc / encoder_pos: [R, S_enc] prompt ids (image slots and padding
            hold the encoder pad id), document ids (int32, -1 = padding), in-document positions.
        decoder_ids / labels / decoder_doc / decoder_pos / key: [R, S_dec] decoder inputs,
            labels (ignore_index on padding), document ids, positions, task-language key id of
            each token (0 on padding, where labels are ignored).
        image_samples: batch indices of the images, in row-major (row, document) order.
        image_slots: [images, 2] (row, first column) of each image's tokens.
        rows: the plan (:func:`plan_rows`) plus appended empty rows.
    """

    encoder_ids: np.ndarray
    encoder_doc: np.ndarray
    encoder_pos: np.ndarray
    decoder_ids: np.ndarray
    labels: np.ndarray
    decoder_doc: np.ndarray
    decoder_pos: np.ndarray
    key: np.ndarray
    image_samples: np.ndarray
    image_slots: np.ndarray
    rows: list[list[int]]

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def pack_batch(
    tokens: TokenBatch,
    has_image: np.ndarray,
    key: np.ndarray,
    *,
    num_image_tokens: int,
    enc_row: int,
    dec_row: int,
    cfg: BatchConfig,
    row_multiple: int = 1,
) -> PackedRows:
    """Pack a padded local batch into rows (see the module docstring).

    Args:
        tokens: the collated batch (cropped and shifted as without packing).
        has_image: bool [B]; a sample with an image gets ``num_image_tokens`` encoder slots.
        key: [B] task-language key ids.
        enc_row / dec_row: row lengths.
        cfg: pad ids and ignore_index.
        row_multiple: append empty rows up to a multiple of this (whole micro-batches).
    """
    p_len = tokens.encoder_attention_mask.sum(1).numpy()
    t_len = tokens.decoder_attention_mask.sum(1).numpy()
    has_image = np.asarray(has_image, bool)
    n_img = np.where(has_image, num_image_tokens, 0)
    rows = plan_rows(n_img + p_len, t_len, enc_row, dec_row)
    while len(rows) % row_multiple:
        rows.append([])
    r_count = len(rows)
    enc_ids = np.full((r_count, enc_row), cfg.encoder_pad_id, np.int64)
    enc_doc = np.full((r_count, enc_row), -1, np.int32)
    enc_pos = np.zeros((r_count, enc_row), np.int64)
    dec_ids = np.full((r_count, dec_row), cfg.decoder_pad_id, np.int64)
    labels = np.full((r_count, dec_row), cfg.ignore_index, np.int64)
    dec_doc = np.full((r_count, dec_row), -1, np.int32)
    dec_pos = np.zeros((r_count, dec_row), np.int64)
    tok_key = np.zeros((r_count, dec_row), np.int64)
    src_enc = tokens.encoder_input_ids.numpy()
    src_dec = tokens.decoder_input_ids.numpy()
    src_lab = tokens.labels.numpy()
    image_samples, image_slots = [], []
    for r, members in enumerate(rows):
        e = d = 0
        for doc, i in enumerate(members):
            ni, p, t = int(n_img[i]), int(p_len[i]), int(t_len[i])
            if ni:
                image_samples.append(i)
                image_slots.append((r, e))
            enc_ids[r, e + ni : e + ni + p] = src_enc[i, :p]
            enc_doc[r, e : e + ni + p] = doc
            enc_pos[r, e : e + ni + p] = np.arange(ni + p)
            dec_ids[r, d : d + t] = src_dec[i, :t]
            labels[r, d : d + t] = src_lab[i, :t]
            dec_doc[r, d : d + t] = doc
            dec_pos[r, d : d + t] = np.arange(t)
            tok_key[r, d : d + t] = key[i]
            e, d = e + ni + p, d + t
    return PackedRows(
        enc_ids,
        enc_doc,
        enc_pos,
        dec_ids,
        labels,
        dec_doc,
        dec_pos,
        tok_key,
        np.asarray(image_samples, np.int64),
        np.asarray(image_slots, np.int64).reshape(-1, 2),
        rows,
    )


def useful_fractions(
    p_len: np.ndarray, t_len: np.ndarray, has_image: np.ndarray, num_image_tokens: int,
    enc_slots: int, dec_slots: int,
) -> tuple[float, float]:
    """(encoder, decoder) real tokens / computed token slots."""
    enc = float(np.sum(p_len) + num_image_tokens * np.sum(has_image))
    return enc / max(enc_slots, 1), float(np.sum(t_len)) / max(dec_slots, 1)
