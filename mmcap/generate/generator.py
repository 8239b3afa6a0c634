"""Caption / translation generation on mmcap's :class:`~mmcap.model.captioner.CaptioningModel`.

One call: the vision tower and BART encoder run once per batch (a group, below), the encoder
output is repeated for the beams, and the decoder runs step by step through a
:class:`DecoderStepper`: with ``use_cache`` every layer keeps a self-attention KV cache (Gemma-2
sliding layers only their window) and computes the cross-attention K/V of the encoder output
once; without, the whole decoder re-runs on the full sequence every step (the reference the
tests compare against). The final-logit soft-cap is the model's own (``DecoderConfig.
final_logit_softcap``, applied in the LM head); vocabulary padding rows are cut off.

Decoder prompts (SYSTEM.md "Tasks and prompts"): ``[start]`` (BOS then forced as the first
token), or with a zero-shot prefix ``[start, <bos>, prefix...]`` as the official eval's HF
``generate`` builds it (it prepends decoder_start_token_id to ``[<bos>, prefix...]``); the
output is read after the prompt. Prompts start at position 0 (left-aligned, as in training);
samples whose prompts differ in length are generated as separate groups, so every sample is
decoded exactly as it would be alone. Tensor parallelism: every TP rank runs the same search
on the gathered logits. Pipeline parallelism is not supported (one stage must hold the model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core import tensor_parallel

from mmcap.generate.config import GenerationConfig
from mmcap.generate.kv_cache import KVCache, attach_kv_cache
from mmcap.generate.search import beam_search, greedy_search


class DecoderStepper:
    """Next-token logits of a decoder for growing sequences (see :mod:`mmcap.generate.search`).

    Args:
        decoder: a full decoder stage (embedding, all layers and the LM head).
        encoder_out: [S, rows, w] encoder output, one column per search row.
        encoder_mask: bool [rows, S].
        use_cache: KV cache (True) or full recomputation every step.
        max_length: longest decoder sequence (sizes the cache).
    """

    def __init__(self, decoder, encoder_out, encoder_mask, use_cache: bool, max_length: int):
        self.decoder, self.encoder_out, self.encoder_mask = decoder, encoder_out, encoder_mask
        self.cache = KVCache(decoder, max_length) if use_cache else None
        self.vocab_size = decoder.vocab_size
        self.tp = decoder.config.tensor_model_parallel_size

    def _logits(self, ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        logits = self.decoder(ids, self.encoder_out, self.encoder_mask, position_ids=position_ids)
        logits = logits[:, -1]  # [rows, V_pad / tp]
        if self.tp > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[:, : self.vocab_size]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self._logits(tokens, None)
        rows = tokens.shape[0]
        with attach_kv_cache(self.decoder, self.cache):
            # Positions not yet cached (the prompt on the first call, then one token) go in
            # one at a time: each step is a single query over the cached keys.
            for t in range(self.cache.length, tokens.shape[1]):
                pos = torch.full((rows, 1), t, dtype=torch.long, device=tokens.device)
                logits = self._logits(tokens[:, t : t + 1], pos)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def decoder_prompt(cfg: GenerationConfig, prefix_ids: Sequence[int] | None) -> list[int]:
    """``[start]``, or ``[start, bos, *prefix_ids]`` for a zero-shot prefix."""
    if not prefix_ids:
        return [cfg.decoder_start_token_id]
    return [cfg.decoder_start_token_id, cfg.bos_token_id, *prefix_ids]


@torch.no_grad()
def generate_group(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    decoder_prompt_ids: torch.Tensor,
    cfg: GenerationConfig,
    pixel_values: torch.Tensor | None = None,
    image_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Samples with one decoder-prompt length: ``decoder_prompt_ids`` [b, p] -> sequences
    [b, <= p + max_new_tokens] (prompt included; pad after EOS)."""
    if not (model.add_encoder and model.pre_process and model.post_process):
        raise ValueError("generation needs the whole model on one pipeline stage (PP=1)")
    if model.config.sequence_parallel:
        raise ValueError("generation decodes one position per step: build the model without "
                         "sequence parallelism (ParallelConfig.sequence_parallel=False)")
    encoder_out, encoder_mask = model.encode(prompt_ids, prompt_mask, pixel_values, image_tokens)
    k = cfg.num_beams
    if k > 1:  # one encoder column per beam (beams of a sample adjacent)
        encoder_out = encoder_out.repeat_interleave(k, dim=1)
        encoder_mask = encoder_mask.repeat_interleave(k, dim=0)
    max_length = decoder_prompt_ids.shape[1] + cfg.max_new_tokens
    step = DecoderStepper(model.decoder, encoder_out, encoder_mask, cfg.use_cache, max_length)
    if k == 1:
        return greedy_search(step, decoder_prompt_ids, cfg)
    return beam_search(step, decoder_prompt_ids, cfg)


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_tokens: torch.Tensor | None = None,
    prefix_ids: Sequence[Sequence[int] | None] | None = None,
    config: GenerationConfig | None = None,
) -> list[list[int]]:
    """Generate for a batch; returns per sample the token ids after its decoder prompt, up to
    (not including) EOS, without the forced BOS.

    Args:
        model: a :class:`~mmcap.model.captioner.CaptioningModel` (PP=1), in eval mode.
        prompt_ids / prompt_mask: [b, s_p] BART prompt ids and bool mask.
        pixel_values / image_tokens: images (or precomputed image tokens); None = text only.
        prefix_ids: per sample the Gemma ids of a zero-shot prefix (no BOS / EOS), or None.
        config: generation settings (default: the paper's, :class:`GenerationConfig`).
    """
    cfg = config or GenerationConfig()
    b = prompt_ids.shape[0]
    prefix_ids = prefix_ids if prefix_ids is not None else [None] * b
    if len(prefix_ids) != b:
        raise ValueError(f"prefix_ids has {len(prefix_ids)} entries for a batch of {b}")
    prompts = [decoder_prompt(cfg, p) for p in prefix_ids]
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(b)]
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i in range(b) if len(prompts[i]) == length]
        idx = torch.tensor(rows, device=prompt_ids.device)
        seqs = generate_group(
            model,
            prompt_ids[idx],
            prompt_mask[idx],
            torch.tensor([prompts[i] for i in rows], device=prompt_ids.device),
            cfg,
            pixel_values[idx] if pixel_values is not None else None,
            image_tokens[idx] if image_tokens is not None else None,
        )
        for row, seq in zip(rows, seqs.tolist(), strict=True):
            new = seq[length:]
            if cfg.eos_token_id in new:
                new = new[: new.index(cfg.eos_token_id)]
            if length == 1 and cfg.forced_bos and new[:1] == [cfg.bos_token_id]:
                new = new[1:]
            out[row] = new
    return out
