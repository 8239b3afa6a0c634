"""One optimizer step of the captioning model on megatron-core's engine (trainer groundwork).

- Model chunks wrapped in megatron-core ``DistributedDataParallel`` (frozen parameters are not
  in its buffers, so the optimizer never sees them) and stepped by megatron-core's optimizer
  (``get_megatron_optimizer``: distributed optimizer = ZeRO-1, grad clipping, loss scaling).
- ``get_forward_backward_func()``: no pipelining, 1F1B or interleaved. Stages exchange one
  tensor, the decoder activations with the encoder output packed behind them
  (:func:`mmcap.model.captioner.pack_stage_output`), so ``seq_length`` given to the schedule
  counts the packed rows too.
- Per-token loss: ``calculate_per_token_loss`` makes megatron-core divide the summed loss by the
  number of target tokens of the whole global batch (all micro-batches, all DP ranks), so every
  layout computes the same gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from mmcap.data.prompts import ALL_KEYS
from mmcap.model.captioner import packed_rows
from mmcap.model.decoder_base import IGNORE_INDEX
from mmcap.parallel import cuda_factories_on_cpu


@dataclass
class MicroBatch:
    """Tensors of one micro-batch (every pipeline stage gets the same object)."""

    prompt_ids: torch.Tensor  # [b, s_p]
    prompt_mask: torch.Tensor  # bool [b, s_p]
    decoder_input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s], IGNORE_INDEX = no loss
    pixel_values: torch.Tensor | None = None  # [b, 3, H, W]
    image_tokens: torch.Tensor | None = None  # [b, n, d] (feature cache)
    num_image_tokens: int = 0
    has_image: torch.Tensor | None = None  # bool [b] in mixed batches (None = all have one)
    key: torch.Tensor | None = None  # [b] task-language key ids (per-key loss logging)

    @property
    def encoder_mask(self) -> torch.Tensor:
        """The first stage's cross-attention mask, rebuilt for later stages
        (:meth:`mmcap.model.captioner.CaptioningModel.encode`)."""
        b = self.prompt_mask.shape[0]
        dev = self.prompt_mask.device
        img = torch.ones(b, self.num_image_tokens, dtype=torch.bool, device=dev)
        if self.has_image is not None and self.num_image_tokens:
            img = img & self.has_image.to(dev).bool()[:, None]
        return torch.cat([img, self.prompt_mask.bool()], dim=1)


def wrap_model(
    chunks: list[torch.nn.Module],
    grad_reduce_in_fp32: bool = True,
    use_distributed_optimizer: bool = True,
) -> list[DistributedDataParallel]:
    for m in chunks:
        # Must be set before DDP is built: DDP then skips its 1/DP gradient scaling, and the
        # schedule divides by the global token count instead.
        m.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m) for m in chunks
    ]


def build_optimizer(ddp_chunks, optimizer_config: OptimizerConfig):
    """megatron-core optimizer; wires its loss scaling and grad finalisation into the config."""
    with cuda_factories_on_cpu():
        opt = get_megatron_optimizer(optimizer_config, ddp_chunks)
    cfg = ddp_chunks[0].config
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    cfg.no_sync_func = (
        [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    )
    return opt


def _loss_func(labels: torch.Tensor, key: torch.Tensor | None, output: torch.Tensor):
    """(summed loss, target tokens, logging) as megatron-core's per-token loss expects.

    Logging: "lm loss" = [summed CE, tokens]; "key loss" = [num keys, 2] the same per
    task-language key (per-token mean per key = column 0 / column 1)."""
    mask = (labels != IGNORE_INDEX).float()
    per_token = output.float() * mask
    loss = per_token.sum()
    tokens = mask.sum().to(torch.int)
    logs = {"lm loss": torch.stack([loss.detach(), tokens.float()])}
    if key is not None:
        per_sample = torch.stack([per_token.detach().sum(1), mask.sum(1)], dim=1)  # [b, 2]
        by_key = per_sample.new_zeros(len(ALL_KEYS), 2)
        logs["key loss"] = by_key.index_add_(0, key.to(by_key.device), per_sample)
    return loss, tokens, logs


def _forward_step(data_iterator: Iterator[MicroBatch], model):
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
    )
    return out, partial(_loss_func, mb.labels, mb.key)


def train_step(
    ddp_chunks, optimizer, microbatches: list[MicroBatch], *, encoder_hidden: int
) -> dict:
    """Forward + backward over ``microbatches`` (this DP rank's share) and one optimizer step.

    A non-finite global loss skips the update; so does a loss scaler that finds non-finite
    gradients (megatron-core's optimizer: fp16, or bf16 with ``loss_scale`` set).

    Returns (the same on every rank):
        {"loss": per-token mean CE of the global batch, "key_loss": {key: per-token mean},
         "tokens": target tokens of the global batch, "grad_norm" (None when skipped),
         "update_successful", "skipped": None or the reason}.
    """
    for c in ddp_chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    mb0 = microbatches[0]
    b, s = mb0.decoder_input_ids.shape
    s_enc = mb0.num_image_tokens + mb0.prompt_ids.shape[1]
    cfg = ddp_chunks[0].config
    # With sequence parallelism the schedule sends seq_length // TP rows: s / TP decoder rows
    # plus the k packed encoder rows, which every TP rank holds in full.
    k = packed_rows(s_enc, encoder_hidden, cfg.hidden_size)
    seq_length = s + k * (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
    forward_backward = get_forward_backward_func()
    with cuda_factories_on_cpu():
        # The interleaved schedule runs each model chunk on its own pass over the micro-batches.
        data = (
            [iter(microbatches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(microbatches)
        )
        losses = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=ddp_chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=b,
            forward_only=False,
        )
    # The global loss (and per-key sums) on EVERY rank, so all ranks agree on skipping.
    stats = torch.zeros(2 + 2 * len(ALL_KEYS), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        stats[:2] = torch.stack([x["lm loss"] for x in losses]).sum(0).double().cpu()
        if "key loss" in losses[0]:
            stats[2:] = torch.stack([x["key loss"] for x in losses]).sum(0).double().cpu().flatten()
    if torch.distributed.is_initialized():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        stats = stats.to(dev)
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        torch.distributed.all_reduce(
            stats, group=parallel_state.get_pipeline_model_parallel_group()
        )
        stats = stats.cpu()
    tokens = stats[1].item()
    loss = stats[0].item() / tokens if tokens else float("nan")
    per_key = stats[2:].view(len(ALL_KEYS), 2)
    key_loss = {
        k: (per_key[i, 0] / per_key[i, 1]).item()
        for i, k in enumerate(ALL_KEYS)
        if per_key[i, 1] > 0
    }
    result = {
        "loss": loss,
        "key_loss": key_loss,
        "tokens": int(tokens),
        "grad_norm": None,
        "update_successful": False,
        "skipped": None,
    }
    if not math.isfinite(loss):
        # NaN / inf loss: no update (the gradient buffers are zeroed at the next step).
        result["skipped"] = "non-finite loss"
        return result
    with cuda_factories_on_cpu():
        ok, grad_norm, _ = optimizer.step()
    result.update(grad_norm=grad_norm, update_successful=bool(ok))
    if not ok:  # the loss scaler found inf / nan gradients (fp16, or bf16 with a scaler)
        result["skipped"] = "non-finite gradients"
    return result
