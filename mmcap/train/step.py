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

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

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

    @property
    def encoder_mask(self) -> torch.Tensor:
        b = self.prompt_mask.shape[0]
        img = torch.ones(b, self.num_image_tokens, dtype=torch.bool)
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


def _loss_func(labels: torch.Tensor, output: torch.Tensor):
    """(summed loss, target tokens, logging) as megatron-core's per-token loss expects."""
    mask = (labels != IGNORE_INDEX).float()
    loss = (output.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


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
    )
    return out, partial(_loss_func, mb.labels)


def train_step(
    ddp_chunks, optimizer, microbatches: list[MicroBatch], *, encoder_hidden: int
) -> dict:
    """Forward + backward over ``microbatches`` (this DP rank's share) and one optimizer step.

    Returns:
        {"loss": mean per-token loss of the global batch (last stage; else nan),
         "grad_norm", "update_successful"}.
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
        ok, grad_norm, _ = optimizer.step()
    loss = float("nan")
    if parallel_state.is_pipeline_last_stage():
        tot = torch.stack([x["lm loss"] for x in losses]).sum(0)
        torch.distributed.all_reduce(tot, group=parallel_state.get_data_parallel_group())
        loss = (tot[0] / tot[1]).item()
    return {"loss": loss, "grad_norm": grad_norm, "update_successful": ok}
