"""Teacher-forced cross-entropy of a model on a caption dataset, on megatron-core's engine.

The library behind ``tools/eval_loss.py``; the trainer's periodic validation calls
:func:`evaluate_loss` with its own model chunks. Per entry: decoder input = start token 1 +
target shifted right, labels = the target (``<bos>`` ... ``<eos>``), CE averaged over the
target tokens (:mod:`mmcap.eval.results` aggregates).

How the work is laid out:

- Entries with an image and text-only entries (``image == -1``, e.g. JSONL translations) go
  to different micro-batches: a text-only micro-batch runs with ``pixel_values=None``, i.e. the
  encoder sees the prompt alone, exactly as the same sample would run on its own. Entries
  whose record has an image (every entry of an official tar record, translations included)
  are scored with that image, as training feeds them.
- Within each group entries are sorted by (target, prompt) length (less padding), cut into
  micro-batches, and the micro-batches dealt round-robin to the data-parallel ranks; every
  TP/PP rank of one model replica makes the same plan.
- Micro-batches of equal shape run through ONE megatron-core schedule call with
  ``forward_only=True`` (:func:`mmcap.model.stage_io.run_schedule`, the call training uses;
  no pipelining, 1F1B or interleaved). Interleaved runs are topped up with filler copies to
  a multiple of PP (megatron-core's micro-batch grouping); their losses are dropped.
- The last pipeline stage's TP rank 0 of each DP replica holds the per-sample sums; one
  ``all_gather_object`` over the world gives every rank the full result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from mmcap.config import IGNORE_INDEX
from mmcap.data.collate import TokenBatch, collate_tokens
from mmcap.data.config import BatchConfig, ImageConfig
from mmcap.data.images import PILDecoder
from mmcap.data.indexed import CaptionDataset
from mmcap.data.prompts import ALL_KEYS
from mmcap.eval.results import EvalResult, SampleLoss
from mmcap.model.stage_io import MicroBatch, run_schedule, sequence_parallel_pad_multiple


def plan_microbatches(
    dataset: CaptionDataset,
    micro_batch_size: int,
    rows: Sequence[int] | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[np.ndarray]:
    """Entry rows of this DP rank's micro-batches (see the module docstring).

    Args:
        rows: the entries to evaluate (default: all).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.int64)
    image = np.asarray(dataset.entries["image"])[rows]
    t_len = dataset.targets.lengths[rows]
    p_len = dataset.prompts.lengths[rows]
    batches = []
    for with_image in (True, False):
        sel = (image >= 0) == with_image
        order = np.lexsort((rows[sel], p_len[sel], t_len[sel]))  # last key sorts first
        group = rows[sel][order]
        batches += [group[i : i + micro_batch_size] for i in range(0, len(group), micro_batch_size)]
    return batches[dp_rank::dp_size]


def per_sample_loss(mb: MicroBatch, output: torch.Tensor):
    """Loss function of an eval micro-batch (:data:`mmcap.model.stage_io.LossFn`): (summed
    loss, tokens, per-sample CE sums and token counts)."""
    mask = mb.labels != IGNORE_INDEX
    ce_sum = (output.float() * mask).sum(1)  # [b]
    tokens = mask.sum(1)
    return ce_sum.sum(), tokens.sum().to(torch.int), {"ce_sum": ce_sum, "tokens": tokens}


class _Batcher:
    """Entry rows -> :class:`MicroBatch` on ``device`` (pixels only where ``with_pixels``)."""

    def __init__(
        self,
        dataset: CaptionDataset,
        batch_cfg: BatchConfig,
        image_size: int,
        num_image_tokens: int,
        device: torch.device,
    ):
        self.ds, self.cfg, self.device = dataset, batch_cfg, device
        self.decoder = PILDecoder(ImageConfig(size=image_size, backend="pil"))
        self.num_image_tokens = num_image_tokens
        self._image = np.asarray(dataset.entries["image"])

    def tokens(self, rows: np.ndarray) -> TokenBatch:
        return collate_tokens(
            [self.ds.prompt_ids(int(r)) for r in rows],
            [self.ds.target_ids(int(r)) for r in rows],
            self.cfg,
        )

    def has_image(self, rows: np.ndarray) -> bool:
        return bool(self._image[rows[0]] >= 0)

    def microbatch(self, rows: np.ndarray, with_pixels: bool) -> MicroBatch:
        img = self.has_image(rows)
        pixels = None
        if img and with_pixels:
            jpegs = [self.ds.image_bytes(int(self._image[r])) for r in rows]
            pixels = self.decoder(jpegs).to(self.device)
        t = self.tokens(rows).to(self.device)
        return MicroBatch(
            prompt_ids=t.encoder_input_ids,
            prompt_mask=t.encoder_attention_mask,
            decoder_input_ids=t.decoder_input_ids,
            labels=t.labels,
            pixel_values=pixels,
            num_image_tokens=self.num_image_tokens if img else 0,
        )


def _stream(batcher: _Batcher, run: list, with_pixels: bool):
    """Micro-batches of one schedule call, built as the schedule asks for them."""
    for rows, _ in run:
        yield batcher.microbatch(rows, with_pixels)


def _set_eval(chunks: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, bool]]:
    """Switch to eval mode; returns every module's previous flag (the vision tower stays in
    eval mode while training, so ``train()`` would not restore it)."""
    modes = [(m, m.training) for c in chunks for m in c.modules()]
    for c in chunks:
        c.eval()
    return modes


def _gather(local: list[SampleLoss]) -> list[SampleLoss]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [s for part in parts for s in part]


def evaluate_loss(
    model_chunks: torch.nn.Module | list[torch.nn.Module],
    dataset: CaptionDataset,
    *,
    micro_batch_size: int = 8,
    rows: Sequence[int] | None = None,
    batch_cfg: BatchConfig | None = None,
) -> EvalResult:
    """Teacher-forced CE of every entry in ``rows`` (default all) of ``dataset`` (collective
    over the whole world: every rank must call it; every rank gets the full result).

    Args:
        model_chunks: this rank's model chunk(s) (CaptioningModel, optionally DDP-wrapped),
            built for the initialised megatron-core layout; left in their previous train/eval
            mode. Images are decoded with the PIL back-end at the model's
            ``vision.image_size``.
        dataset: the evaluation data (entries carry their key, record id and image row).
        micro_batch_size: entries per micro-batch.
        batch_cfg: crop lengths and padding (default :class:`BatchConfig`: 128 / 128 tokens,
            the training lengths; with sequence parallelism the decoder padding is rounded up
            to a multiple of TP).
    """
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    config = get_model_config(chunks[0])
    model_cfg = get_attr_wrapped_model(chunks[0], "model_config")
    batch_cfg = batch_cfg or BatchConfig()
    batch_cfg = dataclasses.replace(
        batch_cfg,
        pad_multiple=sequence_parallel_pad_multiple(
            batch_cfg.pad_multiple, config.tensor_model_parallel_size, config.sequence_parallel
        ),
    )
    device = next(chunks[0].parameters()).device
    batcher = _Batcher(
        dataset, batch_cfg, model_cfg.vision.image_size, model_cfg.vision.num_image_tokens, device
    )
    plan = plan_microbatches(
        dataset,
        micro_batch_size,
        rows,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    runs: dict[tuple, list] = {}  # equal shapes -> one schedule call; (rows, keep results)
    for r in plan:
        tok = batcher.tokens(r)  # collated again when the schedule runs: only rows are kept
        key = (len(r), tok.encoder_input_ids.shape[1], tok.labels.shape[1], batcher.has_image(r))
        runs.setdefault(key, []).append((r, True))
    has_encoder = [bool(get_attr_wrapped_model(c, "add_encoder")) for c in chunks]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    sums: dict[int, tuple[float, int]] = {}
    modes = _set_eval(chunks)
    try:
        for _, run in sorted(runs.items(), key=lambda kv: kv[0]):
            if len(chunks) > 1 and len(run) % pp:  # interleaved: whole micro-batch groups
                run = run + [(run[-1][0], False)] * (pp - len(run) % pp)
            streams = [_stream(batcher, run, with_pixels) for with_pixels in has_encoder]
            with torch.no_grad():
                losses = run_schedule(
                    chunks,
                    streams,
                    num_microbatches=len(run),
                    shape_of=batcher.microbatch(run[0][0], with_pixels=False),
                    loss_fn=per_sample_loss,
                    forward_only=True,
                    encoder_hidden=model_cfg.encoder.hidden_size,
                )
            for (r, keep), out in zip(run, losses):
                if keep:
                    for row, ce, n in zip(
                        r.tolist(), out["ce_sum"].tolist(), out["tokens"].tolist()
                    ):
                        sums[row] = (ce, n)
    finally:
        for m, training in modes:
            m.training = training
    local = []
    if (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        key_col = np.asarray(dataset.entries["key"])
        for row, (ce, n) in sums.items():
            task, lang = ALL_KEYS[int(key_col[row])].split("-")
            local.append(
                SampleLoss(
                    row=row,
                    id=dataset.record_id(row),
                    task=task,
                    lang=lang,
                    ce=ce / n if n else float("nan"),
                    tokens=n,
                )
            )
    return EvalResult(_gather(local))
