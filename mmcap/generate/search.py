"""Greedy and beam search over a next-token function, with Hugging Face's semantics.

The search sees the model only through a *stepper*: ``step(tokens [rows, cur_len]) ->
logits [rows, vocab]`` (float, the last position's logits) and ``step.reorder(index)`` (beam
search: row ``i`` of the next step continues row ``index[i]``), so a cached and an uncached
stepper must give the same tokens.

Semantics follow transformers' ``generate`` (greedy ``_sample`` and the vectorised
``_beam_search``): logits processors (no-repeat n-gram, forced BOS at length 1, forced EOS at
the last position) act on the log-probabilities; each step keeps the top ``2 * num_beams``
continuations; a continuation that ends in EOS or reaches ``max_length`` is a finished
hypothesis scored ``sum log p / generated_len ** length_penalty`` (generated_len counts the
new tokens including EOS, not the decoder prompt); only those among the top ``num_beams``
may finish; ``early_stopping=True`` ends a sample at ``num_beams`` finished hypotheses.
All rows share one decoder-prompt length (:mod:`mmcap.generate.generator` groups them).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mmcap.generate.config import GenerationConfig

_NEG = -1.0e9  # HF's "impossible" score offset


class Stepper(Protocol):
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor) -> None: ...


def _force(scores: torch.Tensor, rows: torch.Tensor | slice, token: int) -> torch.Tensor:
    scores[rows] = float("-inf")
    scores[rows, token] = 0.0
    return scores


def process_scores(
    tokens: torch.Tensor, scores: torch.Tensor, cfg: GenerationConfig, max_length: int
) -> torch.Tensor:
    """Apply the logits processors to ``scores`` [rows, V] given ``tokens`` [rows, cur_len]."""
    cur_len = tokens.shape[1]
    n = cfg.no_repeat_ngram_size
    if n and cur_len >= n:  # HF: from cur_len + 1 >= n, but no n-gram exists before cur_len n
        windows = tokens.unfold(1, n, 1)  # [rows, cur_len - n + 1, n]: every n-gram
        suffix = tokens[:, cur_len - n + 1 :].unsqueeze(1)  # the last n - 1 tokens
        match = (windows[:, :, :-1] == suffix).all(-1)  # completing it would repeat an n-gram
        hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], match.to(scores.dtype))
        scores = scores.masked_fill(hits > 0, float("-inf"))
    if cfg.vocab_limit is not None:
        scores[:, cfg.vocab_limit :] = float("-inf")
    if cfg.forced_bos and cur_len == 1:
        scores = _force(scores, slice(None), cfg.bos_token_id)
    if cfg.forced_eos_token_id is not None and cur_len == max_length - 1:
        scores = _force(scores, slice(None), cfg.forced_eos_token_id)
    return scores


@torch.no_grad()
def greedy_search(step: Stepper, prompt: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """``prompt`` [b, p] -> sequences [b, <= p + max_new_tokens] (pad after EOS)."""
    tokens = prompt
    max_length = prompt.shape[1] + cfg.max_new_tokens
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    while tokens.shape[1] < max_length:
        scores = process_scores(tokens, step(tokens).float(), cfg, max_length)
        nxt = scores.argmax(-1).masked_fill(~unfinished, cfg.pad_token_id)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        unfinished &= nxt != cfg.eos_token_id
        if not unfinished.any():
            break
    return tokens


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, k, ...] rows picked along dim 1 by index [B, k']."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(step: Stepper, prompt: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """``prompt`` [B, p] (one row per sample; the stepper's rows are B * num_beams, beams of a
    sample adjacent) -> the best hypothesis per sample [B, p + max_new_tokens] (pad-filled)."""
    B, p = prompt.shape
    K, dev = cfg.num_beams, prompt.device
    max_length = p + cfg.max_new_tokens
    running = prompt.new_full((B, K, max_length), cfg.pad_token_id)
    running[:, :, :p] = prompt[:, None]
    finished = running.clone()
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = _NEG  # identical beams at the start: only the first one expands
    fin_scores = torch.full((B, K), _NEG, device=dev)
    fin_flag = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    in_top_k = torch.arange(2 * K, device=dev) < K
    offsets = torch.arange(B, device=dev)[:, None] * K
    cur = p
    while True:
        flat = running[:, :, :cur].reshape(B * K, cur)
        logp = torch.log_softmax(step(flat).float(), -1)
        logp = process_scores(flat, logp, cfg, max_length)
        V = logp.shape[-1]
        total = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = torch.topk(total, 2 * K)
        parent, token = top_idx // V, top_idx % V
        cand = _gather(running, parent)
        cand[:, :, cur] = token
        hits = (token == cfg.eos_token_id) | (cur + 1 >= max_length)
        # Next running beams: the best continuations that did not finish.
        run_lp = top_lp + hits.float() * _NEG
        keep = torch.topk(run_lp, K).indices
        running, run_scores = _gather(cand, keep), _gather(run_lp, keep)
        # Finished hypotheses: merge the new ones (top K only) with the kept ones.
        just = hits & in_top_k[None]
        scored = top_lp / float(cur + 1 - p) ** cfg.length_penalty
        if cfg.early_stopping:
            scored = scored + fin_flag.all(-1, keepdim=True).float() * _NEG
        scored = scored + (~improvable).float() * _NEG + (~just).float() * _NEG
        best = torch.topk(torch.cat([fin_scores, scored], 1), K).indices
        finished = _gather(torch.cat([finished, cand], 1), best)
        fin_scores = _gather(torch.cat([fin_scores, scored], 1), best)
        fin_flag = _gather(torch.cat([fin_flag, just], 1), best)
        step.reorder((_gather(parent, keep) + offsets).flatten())
        cur += 1
        # HF's early-stop heuristic: can the best running beam still beat the worst finished?
        worst = torch.where(fin_flag, fin_scores.min(1, keepdim=True).values, _NEG)
        best_running = run_scores[:, :1] / float(cur - p) ** cfg.length_penalty
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        all_done = bool(fin_flag.all()) and cfg.early_stopping
        if not improvable.any() or all_done or bool(hits.all()):
            break
    return finished[:, 0]
