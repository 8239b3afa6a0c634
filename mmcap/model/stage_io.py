"""What a pipeline stage consumes, and the one megatron-core schedule call of train and eval.

- :class:`MicroBatch`: the tensors of one micro-batch (every pipeline stage gets the same
  object; later stages use only the decoder side, the labels and the encoder mask).
- :func:`build_encoder_mask`: the cross-attention mask ``[image rows ; prompt mask]``. The
  encoder builds it on the first stage; later stages rebuild the same mask from the micro-batch
  (:attr:`MicroBatch.encoder_mask`), so both sides share this one function.
- :func:`pack_stage_output` / :func:`unpack_stage_input`: the encoder output travels with the
  decoder activations to every later stage, packed into the one tensor megatron-core's
  schedules send between stages: ``[s_dec(/tp) + k, b, h_dec]``, the last ``k`` rows holding
  the encoder output [s_enc, b, h_enc] reshaped to the decoder width. One tensor means
  megatron-core's backward (which only back-propagates a stage's FIRST output) carries the
  encoder-output gradient of every later stage back to the encoder, and the interleaved
  schedule (which sends exactly one tensor) works unchanged.
- :func:`split_microbatches`: a collated local batch -> the step's micro-batches.
- :class:`PackedDocs`: the document layout of packed rows (sequence packing,
  :mod:`mmcap.data.packing`): document ids and in-document positions of both sides and where
  the image tokens go; every stage gets it with its micro-batch (all of it derives from
  token lengths, so stages without the encoder have it too).
- :func:`sequence_parallel_pad_multiple` / :func:`stage_seq_length`: the padding rule under
  sequence parallelism and the ``seq_length`` of the one tensor stages exchange (decoder rows
  plus the packed encoder rows, :func:`mmcap.model.captioner.pack_stage_output`).
- :func:`make_forward_step` / :func:`run_schedule`: megatron-core's
  ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved) over a list of
  micro-batches with a caller-chosen loss function (train: per-token loss and per-key sums;
  eval: per-sample CE sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from mmcap.config.constants import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "MicroBatch",
    "PackedDocs",
    "build_encoder_mask",
    "make_forward_step",
    "pack_stage_output",
    "packed_rows",
    "run_schedule",
    "sequence_parallel_pad_multiple",
    "split_microbatches",
    "split_packed_microbatches",
    "stage_seq_length",
    "unpack_stage_input",
]

# loss_fn(micro_batch, stage output) -> (summed loss, token count, logging dict); megatron-core's
# per-token loss convention (``calculate_per_token_loss``).
LossFn = Callable[["MicroBatch", torch.Tensor], tuple]


def packed_rows(s_enc: int, encoder_hidden: int, decoder_hidden: int) -> int:
    """Rows of decoder width that hold an [s_enc, b, encoder_hidden] encoder output."""
    return -(-s_enc * encoder_hidden // decoder_hidden)


def pack_stage_output(hidden: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
    """[s, b, h] + [s_enc, b, w] -> [s + k, b, h] (differentiable; zero padding at the end)."""
    s_enc, b, w = encoder_out.shape
    h = hidden.shape[-1]
    k = packed_rows(s_enc, w, h)
    flat = encoder_out.transpose(0, 1).reshape(b, s_enc * w).to(hidden.dtype)
    flat = torch.nn.functional.pad(flat, (0, k * h - s_enc * w))
    return torch.cat([hidden, flat.view(b, k, h).transpose(0, 1)], dim=0)


def unpack_stage_input(
    packed: torch.Tensor, s_enc: int, encoder_hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_stage_output`: (hidden [s, b, h], encoder_out [s_enc, b, w])."""
    k = packed_rows(s_enc, encoder_hidden, packed.shape[-1])
    hidden, rows = packed[:-k], packed[-k:]
    b = packed.shape[1]
    flat = rows.transpose(0, 1).reshape(b, -1)[:, : s_enc * encoder_hidden]
    return hidden, flat.view(b, s_enc, encoder_hidden).transpose(0, 1)


def build_encoder_mask(
    prompt_mask: torch.Tensor, num_image_tokens: int = 0, has_image: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [b, n + s_p]: ``n`` image rows (masked for samples without an image in a mixed
    batch, ``has_image`` bool [b]) followed by the prompt mask [b, s_p]."""
    b = prompt_mask.shape[0]
    dev = prompt_mask.device
    img = torch.ones(b, num_image_tokens, dtype=torch.bool, device=dev)
    if has_image is not None and num_image_tokens:
        if has_image.device != dev:
            has_image = has_image.to(dev, non_blocking=True)
        img = img & has_image.bool()[:, None]
    return torch.cat([img, prompt_mask.bool()], dim=1)


@dataclass
class PackedDocs:
    """Where the documents (samples) of packed rows are.

    Row r of a packed micro-batch holds documents 0, 1, ... as contiguous runs on both sides:
    document i's encoder part ([image tokens ;] prompt) in the encoder row and its decoder part
    (decoder input / labels) in the decoder row, padding (id -1) at the end. Attention stays
    within a document (:func:`mmcap.ops.attention.attention`'s ``doc_ids``), cross-attention
    reaches only the same document's encoder part, positions restart at 0 per document.

    Args:
        encoder_doc / decoder_doc: int32 [b, S_enc] / [b, S_dec] document ids, -1 = padding.
        encoder_pos / decoder_pos: int64, the same shapes: position within the document.
        image_index: int64 [images * n]: flat positions (``row * S_enc + column``) of the image
            tokens of the micro-batch's images, in image order; None without images.
    """

    encoder_doc: torch.Tensor
    decoder_doc: torch.Tensor
    encoder_pos: torch.Tensor
    decoder_pos: torch.Tensor
    image_index: torch.Tensor | None = None

    def to(self, device) -> PackedDocs:
        return PackedDocs(
            *(t.to(device) for t in (self.encoder_doc, self.decoder_doc, self.encoder_pos)),
            self.decoder_pos.to(device),
            None if self.image_index is None else self.image_index.to(device),
        )


@dataclass
class ImageRows:
    """Which samples of a mixed micro-batch have an image, as index tensors cut on the host
    (:func:`split_microbatches`): the encoder then splits the micro-batch without reading
    ``has_image`` back from the device (``nonzero`` is a host sync on CUDA)."""

    image: torch.Tensor  # int64 [k]: samples with an image, ascending
    text: torch.Tensor  # int64 [b - k]: samples without one, ascending


@dataclass
class MicroBatch:
    """Tensors of one micro-batch (every pipeline stage gets the same object).

    Packed micro-batches (``packed`` set) hold rows instead of samples: ``prompt_ids`` /
    ``prompt_mask`` span the whole encoder row (image slots hold a placeholder id and are
    filled from ``pixel_values`` / ``image_tokens``, one per image of the micro-batch, at
    ``packed.image_index``), ``num_image_tokens`` is 0 and ``key`` is per decoder token.
    """

    prompt_ids: torch.Tensor  # [b, s_p]
    prompt_mask: torch.Tensor  # bool [b, s_p]
    decoder_input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s], IGNORE_INDEX = no loss
    pixel_values: torch.Tensor | None = None  # [b, 3, H, W]
    image_tokens: torch.Tensor | None = None  # [b, n, d] (feature cache)
    num_image_tokens: int = 0
    has_image: torch.Tensor | None = None  # bool [b] in mixed batches (None = all have one)
    image_rows: ImageRows | None = None  # has_image as host-cut indices (mixed batches)
    key: torch.Tensor | None = None  # [b] task-language key ids (per-key loss logging)
    packed: PackedDocs | None = None  # packed rows (sequence packing)

    @property
    def encoder_mask(self) -> torch.Tensor:
        """The first stage's cross-attention mask, rebuilt for later stages."""
        return build_encoder_mask(self.prompt_mask, self.num_image_tokens, self.has_image)

    @property
    def encoder_len(self) -> int:
        """Encoder rows: image tokens + prompt tokens."""
        return self.num_image_tokens + self.prompt_ids.shape[1]


def split_microbatches(
    tokens,
    micro_batch_size: int,
    *,
    num_image_tokens: int,
    has_image: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> list[MicroBatch]:
    """A collated :class:`mmcap.data.collate.TokenBatch` (+ images) -> micro-batches on
    ``device``.

    Args:
        num_image_tokens: image rows of the encoder when the batch has images.
        has_image: bool [b] (every stage passes it: stages without the encoder get no pixels
            but need the image rows of the encoder mask); None = every sample has an image if
            pixels / features are given. Without any image the encoder sees the prompts alone.
            A host tensor (the data pipeline's): mixed micro-batches also get it as
            :class:`ImageRows` index tensors, so the encoder splits them without a host sync.
    """
    b = tokens.decoder_input_ids.shape[0]
    if micro_batch_size < 1 or b % micro_batch_size:
        raise ValueError(f"{b} samples do not split into micro-batches of {micro_batch_size}")
    # Later pipeline stages get no pixels but the same image rows (has_image is the truth).
    if has_image is not None:
        any_image = bool(has_image.any())
    else:
        any_image = pixels is not None or features is not None
    mixed = any_image and has_image is not None and not bool(has_image.all())
    n_img = num_image_tokens if any_image else 0
    out = []
    for i in range(0, b, micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        rows = None
        if mixed:
            here = torch.as_tensor(has_image[sl]).cpu().bool()  # the host's copy: no sync
            rows = ImageRows(
                image=torch.nonzero(here).flatten().to(device),
                text=torch.nonzero(~here).flatten().to(device),
            )
        out.append(
            MicroBatch(
                prompt_ids=tokens.encoder_input_ids[sl].to(device),
                prompt_mask=tokens.encoder_attention_mask[sl].to(device),
                decoder_input_ids=tokens.decoder_input_ids[sl].to(device),
                labels=tokens.labels[sl].to(device),
                pixel_values=pixels[sl].to(device) if any_image and pixels is not None else None,
                image_tokens=features[sl].to(device)
                if any_image and features is not None
                else None,
                num_image_tokens=n_img,
                has_image=has_image[sl].to(device) if mixed else None,
                image_rows=rows,
                key=key[sl].to(device) if key is not None else None,
            )
        )
    return out


def split_packed_microbatches(
    packed,
    micro_batch_size: int,
    *,
    num_image_tokens: int,
    pixels: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    allow_partial: bool = False,
) -> list[MicroBatch]:
    """Packed rows (:class:`mmcap.data.packing.PackedRows`) -> micro-batches of
    ``micro_batch_size`` ROWS on ``device``: the row count is a multiple of it, or, with
    ``allow_partial`` (no pipeline parallelism: no fixed p2p shape), the last micro-batch
    holds the rest.

    Args:
        pixels / features: [B, ...] per sample of the local batch (as for
            :func:`split_microbatches`); each micro-batch gets those of its rows' images, in
            the order of ``PackedDocs.image_index``.
    """
    rows = packed.num_rows
    if micro_batch_size < 1 or (rows % micro_batch_size and not allow_partial):
        raise ValueError(f"{rows} packed rows do not split into micro-batches of {micro_batch_size}")
    s_enc = packed.encoder_ids.shape[1]
    slot_row = packed.image_slots[:, 0]
    out = []
    for r0 in range(0, rows, micro_batch_size):
        r1 = min(r0 + micro_batch_size, rows)
        sel = (slot_row >= r0) & (slot_row < r1)
        samples = torch.from_numpy(packed.image_samples[sel])
        slots = torch.from_numpy(packed.image_slots[sel])
        starts = (slots[:, 0] - r0) * s_enc + slots[:, 1]
        index = (starts[:, None] + torch.arange(num_image_tokens)).flatten()

        def rows_of(a, dtype=None):
            t = torch.from_numpy(a[r0:r1])
            return (t if dtype is None else t.to(dtype)).to(device)

        docs = PackedDocs(
            encoder_doc=rows_of(packed.encoder_doc),
            decoder_doc=rows_of(packed.decoder_doc),
            encoder_pos=rows_of(packed.encoder_pos),
            decoder_pos=rows_of(packed.decoder_pos),
            image_index=index.to(device) if len(samples) else None,
        )
        has_images = len(samples) > 0
        out.append(
            MicroBatch(
                prompt_ids=rows_of(packed.encoder_ids),
                prompt_mask=docs.encoder_doc >= 0,
                decoder_input_ids=rows_of(packed.decoder_ids),
                labels=rows_of(packed.labels),
                pixel_values=pixels[samples].to(device)
                if has_images and pixels is not None
                else None,
                image_tokens=features[samples].to(device)
                if has_images and features is not None
                else None,
                num_image_tokens=0,
                key=rows_of(packed.key),
                packed=docs,
            )
        )
    return out


def sequence_parallel_pad_multiple(pad_multiple: int, tp: int, sequence_parallel: bool) -> int:
    """Decoder padding multiple: with sequence parallelism the decoder rows split over TP."""
    return math.lcm(pad_multiple, tp) if sequence_parallel else pad_multiple


def stage_seq_length(mb: MicroBatch, config, encoder_hidden: int) -> int:
    """``seq_length`` for megatron-core's schedule: decoder rows + packed encoder rows.

    With sequence parallelism the schedule sends ``seq_length // TP`` rows: ``s / TP`` decoder
    rows plus the ``k`` packed encoder rows, which every TP rank holds in full.
    """
    k = packed_rows(mb.encoder_len, encoder_hidden, config.hidden_size)
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return mb.decoder_input_ids.shape[1] + k * tp


def make_forward_step(loss_fn: LossFn):
    """megatron-core ``forward_step_func`` running the stage on the next micro-batch."""

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        mb = next(data_iterator)
        out = model(
            mb.prompt_ids,
            mb.decoder_input_ids,
            mb.prompt_mask,
            pixel_values=mb.pixel_values,
            image_tokens=mb.image_tokens,
            labels=mb.labels,
            encoder_mask=mb.encoder_mask,
            has_image=mb.has_image,
            image_rows=mb.image_rows,
            packed=mb.packed,
        )
        return out, partial(loss_fn, mb)

    return forward_step


def run_schedule(
    chunks: list,
    microbatches: Iterable[MicroBatch] | list[Iterable[MicroBatch]],
    *,
    num_microbatches: int,
    shape_of: MicroBatch,
    loss_fn: LossFn,
    forward_only: bool,
    encoder_hidden: int,
) -> list[dict]:
    """One megatron-core schedule call over this rank's micro-batches.

    Args:
        chunks: this rank's model chunk(s) (more than one = interleaved schedule).
        microbatches: the micro-batches, or one iterable per chunk (the interleaved schedule
            runs each chunk on its own pass; a list of MicroBatch is re-iterated per chunk).
        shape_of: a micro-batch with the shape of all of them (the p2p tensor shape).
        loss_fn: see :data:`LossFn`.
    Returns:
        megatron-core's per-micro-batch logging dicts (last pipeline stage), else [].
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from mmcap.parallel import cuda_factories_on_cpu

    config = get_model_config(chunks[0])
    if isinstance(microbatches, list) and microbatches and isinstance(microbatches[0], MicroBatch):
        data = [iter(microbatches) for _ in chunks]
    elif isinstance(microbatches, list):
        data = [iter(m) for m in microbatches]
    else:
        data = [iter(microbatches)]
    with cuda_factories_on_cpu():
        losses = get_forward_backward_func()(
            forward_step_func=make_forward_step(loss_fn),
            data_iterator=data if len(chunks) > 1 else data[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=stage_seq_length(shape_of, config, encoder_hidden),
            micro_batch_size=shape_of.decoder_input_ids.shape[0],
            forward_only=forward_only,
        )
    return losses or []
