"""Sequence lengths of the CE eval: the official defaults, and the check that a dataset fits a
model's position tables before anything runs.

The official ``src/eval_loss.py`` scores at 224 px with prompts up to 447 encoder tokens and
targets up to 1024 decoder tokens, cropped by the tokenizers' truncation, which keeps the final
``</s>`` / ``<eos>`` (SYSTEM.md "Evaluation"; training crops to 128 / 128 and cuts the tail).
447 = 1024 - 577: BART's 1024 positions minus the image tokens of a 768 px image.

The encoder reads ``image tokens + padded prompt`` positions of one learned table
(``EncoderConfig.max_position_embeddings``), the decoder ``padded target`` positions
(``DecoderConfig.max_position_embeddings``: a learned table for the Florence-2 decoder, the
declared RoPE range for Gemma-2). :func:`check_position_limits` finds the longest of both,
exactly as :func:`mmcap.data.collate.collate_tokens` will pad them, and raises a
:class:`SequenceTooLongError` naming the lengths, the limit and the entry instead of the
IndexError of an out-of-range position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmcap.config import ModelConfig
from mmcap.data.collate import padded_length
from mmcap.data.config import BatchConfig
from mmcap.data.indexed import CaptionDataset

EVAL_IMAGE_SIZE = 224  # official eval_loss.py --image_size
EVAL_MAX_PROMPT_TOKENS = 447  # official --max_encoder_seq_length (1024 - 577)
EVAL_MAX_TARGET_TOKENS = 1024  # official --max_decoder_seq_length


def eval_batch_config(
    max_prompt_tokens: int = EVAL_MAX_PROMPT_TOKENS,
    max_target_tokens: int = EVAL_MAX_TARGET_TOKENS,
    keep_eos_on_crop: bool = True,
) -> BatchConfig:
    """The CE eval's batch config: official lengths, crops keep the final token."""
    return BatchConfig(
        max_prompt_tokens=max_prompt_tokens,
        max_target_tokens=max_target_tokens,
        keep_eos_on_crop=keep_eos_on_crop,
    )


class SequenceTooLongError(ValueError):
    """A sequence of the eval would index past a model's position table."""


def check_position_limits(
    model_cfg: ModelConfig,
    dataset: CaptionDataset,
    batch_cfg: BatchConfig,
    rows: Sequence[int] | None = None,
) -> dict[str, int]:
    """Raise :class:`SequenceTooLongError` if an entry of ``rows`` (default all) would not fit;
    returns the longest padded ``encoder`` and ``decoder`` lengths otherwise.

    Args:
        model_cfg: the model as it will run (``vision.image_size`` = the eval resolution).
        dataset: the eval data. batch_cfg: crop lengths and padding of the eval.
    """
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return {"encoder": 0, "decoder": 0}
    image_tokens = model_cfg.vision.num_image_tokens
    has_image = np.asarray(dataset.entries["image"])[rows] >= 0
    p_len = np.minimum(dataset.prompts.lengths[rows], batch_cfg.max_prompt_tokens)
    t_len = np.minimum(dataset.targets.lengths[rows], batch_cfg.max_target_tokens)
    enc_limit = model_cfg.encoder.max_position_embeddings
    dec_limit = model_cfg.decoder.max_position_embeddings
    longest = {"encoder": 0, "decoder": 0}
    for with_image in (True, False):  # separate micro-batches (mmcap.eval.loss)
        sel = np.nonzero(has_image == with_image)[0]
        if not len(sel):
            continue
        i = sel[np.argmax(p_len[sel])]
        prompt = padded_length(int(p_len[i]), batch_cfg.max_prompt_tokens, batch_cfg)
        img = image_tokens if with_image else 0
        longest["encoder"] = max(longest["encoder"], img + prompt)
        if img + prompt > enc_limit:
            raise SequenceTooLongError(
                f"encoder sequence too long for {model_cfg.name}: "
                + (
                    f"{img} image tokens ({model_cfg.vision.image_size} px) + "
                    if with_image
                    else ""
                )
                + f"{prompt} prompt tokens (entry row {int(rows[i])}, record "
                f"{dataset.record_id(int(rows[i]))!r}: {int(p_len[i])} tokens after the crop to "
                f"{batch_cfg.max_prompt_tokens}, padded to {prompt}) = {img + prompt} > "
                f"{enc_limit}, the encoder's position table "
                f"(EncoderConfig.max_position_embeddings); lower the image size or "
                f"--max-prompt-tokens"
            )
    j = int(np.argmax(t_len))
    target = padded_length(int(t_len[j]), batch_cfg.max_target_tokens, batch_cfg)
    longest["decoder"] = target
    if target > dec_limit:
        raise SequenceTooLongError(
            f"decoder sequence too long for {model_cfg.name}: {target} target tokens (entry "
            f"row {int(rows[j])}, record {dataset.record_id(int(rows[j]))!r}: {int(t_len[j])} "
            f"tokens after the crop to {batch_cfg.max_target_tokens}, padded to {target}) > "
            f"{dec_limit}, the decoder's position table (DecoderConfig.max_position_embeddings); "
            f"lower --max-target-tokens"
        )
    return longest
