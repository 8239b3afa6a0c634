"""Attention back-end registry: the table of back-ends, the choice per call, and `attention()`.

Each back-end is an `AttentionBackend` row: `is_available(device)` (installed and usable on
that device) and `supports(q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p)`
(this call's features), both returning `(ok, reason)`, plus its forward function.

Choice, highest priority first:
1. env var `MMCAP_ATTN_BACKEND=math|flex|flash|te|sdpa` (global switch, e.g. to force the
   reference path) -- it wins over the `backend=` argument;
2. the `backend=` argument;
3. automatic: on CUDA the first usable of flash, te, sdpa (calls without a soft-cap), flex,
   math; elsewhere math (flex and sdpa on CPU only when forced: flex's compile is slow and it
   has no CPU backward; math is the reference).
A forced back-end that cannot run the call is an error naming who forced it. Each
(back-end, reason) choice is logged once at INFO on logger "mmcap.ops.attention".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from mmcap.ops.attention import flash, flex, math_ref, sdpa, te
from mmcap.ops.attention.math_ref import check_attention_inputs

__all__ = [
    "AUTO_ORDER_CUDA",
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackend",
    "attention",
    "available_backends",
    "register_backend",
    "select_backend",
]

ENV_VAR = "MMCAP_ATTN_BACKEND"
AUTO_ORDER_CUDA = ("flash", "te", "sdpa", "flex", "math")
AUTO_ORDER_OTHER = ("math",)

logger = logging.getLogger("mmcap.ops.attention")


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation.

    Args:
        name: registry key (what `backend=` and MMCAP_ATTN_BACKEND take).
        is_available: `(device | None) -> (ok, reason)`; None checks installation only.
        supports: `(q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids)
            -> (ok, reason)`: whether this call's features are within the back-end's reach.
        forward: `(q, k, v, *, softmax_scale, causal, softcap, window, kv_padding_mask,
            dropout_p) -> out`, bshd in and out.
    """

    name: str
    is_available: Callable[[torch.device | None], tuple[bool, str]]
    supports: Callable[..., tuple[bool, str]]
    forward: Callable[..., torch.Tensor]


BACKENDS: dict[str, AttentionBackend] = {}
_logged_choices: set[tuple[str, str]] = set()


def register_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a back-end in the registry.

    Args:
        backend: the back-end row; its `name` becomes selectable.
    """
    BACKENDS[backend.name] = backend


for _row in (
    AttentionBackend("math", math_ref.is_available, math_ref.supports, math_ref.attention_ref),
    AttentionBackend("flex", flex.is_available, flex.supports, flex.flex_forward),
    AttentionBackend("flash", flash.is_available, flash.supports, flash.flash_forward),
    AttentionBackend("te", te.is_available, te.supports, te.te_forward),
    AttentionBackend("sdpa", sdpa.is_available, sdpa.supports, sdpa.sdpa_forward),
):
    register_backend(_row)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of installed back-ends, in registry order.

    Args:
        device: if given, only back-ends that can run on this device.
    """
    dev = None if device is None else torch.device(device)
    return [name for name, b in BACKENDS.items() if b.is_available(dev)[0]]


def _usable(backend: AttentionBackend, q, k, v, features: dict) -> tuple[bool, str]:
    ok, why = backend.is_available(q.device)
    if ok:
        ok, why = backend.supports(q, k, v, **features)
    return ok, why


def _log_once(name: str, reason: str) -> None:
    if torch.compiler.is_compiling():  # a logger call would break the graph (logged eagerly)
        return
    if (name, reason) not in _logged_choices:
        _logged_choices.add((name, reason))
        logger.info("attention back-end: %s (%s)", name, reason)


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softcap: float | None = None,
    window: int | None = None,
    kv_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> str:
    """Name of the back-end that `attention()` would run for this call.

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d].
        v: [b, s_k, h_kv, d].
        causal: causal mask.
        softcap: logit soft-cap or None.
        window: sliding window or None.
        kv_padding_mask: bool [b, s_k] or None.
        dropout_p: attention dropout probability.
        backend: force a back-end by name (overridden by MMCAP_ATTN_BACKEND).
        doc_ids: (q_doc, kv_doc) document ids of packed rows, or None.

    Raises:
        ValueError: invalid inputs, or an unknown back-end name.
        RuntimeError: a forced back-end is not installed or cannot run this call.
    """
    check_attention_inputs(
        q,
        k,
        v,
        causal=causal,
        softcap=softcap,
        window=window,
        kv_padding_mask=kv_padding_mask,
        dropout_p=dropout_p,
        doc_ids=doc_ids,
    )
    features = dict(
        causal=causal,
        softcap=softcap,
        window=window,
        kv_padding_mask=kv_padding_mask,
        dropout_p=dropout_p,
        doc_ids=doc_ids,
    )
    env = os.environ.get(ENV_VAR, "").strip().lower()
    forced, source = (env, f"{ENV_VAR}={env}") if env else (backend, f"backend={backend!r}")
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(
                f"unknown attention back-end {forced!r} (from {source}); known: {sorted(BACKENDS)}"
            )
        ok, why = _usable(BACKENDS[forced], q, k, v, features)
        if not ok:
            raise RuntimeError(
                f"attention back-end {forced!r} forced by {source} cannot run this call: {why}"
            )
        _log_once(forced, f"forced by {source}")
        return forced

    order = AUTO_ORDER_CUDA if q.device.type == "cuda" else AUTO_ORDER_OTHER
    skipped = []
    for name in order:
        ok, why = _usable(BACKENDS[name], q, k, v, features)
        if ok:
            if q.device.type != "cuda":
                skipped.append(
                    f"{q.device.type}: automatic choice is math only; "
                    f"force flex with backend='flex' or {ENV_VAR}=flex"
                )
            _log_once(name, "; ".join(skipped) or "first choice")
            return name
        skipped.append(f"{name}: {why}")
    raise RuntimeError(f"no attention back-end can run this call: {'; '.join(skipped)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    softcap: float | None = None,
    window: int | None = None,
    kv_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention in flash-attn's bshd layout, on the best available back-end.

    Scores = (q @ k^T) * softmax_scale; if softcap, scores = softcap * tanh(scores / softcap)
    (before masking, as HF Gemma-2); then causal / window / kv padding masks; softmax in
    float32; then @ v. A query whose every key is masked (e.g. an all-padding example) gets
    output 0, never NaN, in every back-end.

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d], h_q % h_kv == 0; query head i uses kv head i // (h_q // h_kv).
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T (usually head_dim ** -0.5).
        causal: query i attends key j only if j <= i (top-left aligned; needs s_q == s_k).
        softcap: Gemma-2 attention logit soft-cap, or None.
        window: sliding window, HF Gemma-2 semantics: query i attends key j iff
            i - window < j <= i (`window` keys counting itself). Needs causal=True.
        kv_padding_mask: bool [b, s_k], True = real key, False = padding.
        dropout_p: dropout on attention probabilities; pass 0 outside training.
        backend: None for automatic choice, or "math" | "flex" | "flash" | "te" to force one
            (the MMCAP_ATTN_BACKEND env var overrides this).
        doc_ids: sequence packing: (q_doc [b, s_q], kv_doc [b, s_k]) integer document ids;
            query i attends key j only if q_doc[i] == kv_doc[j] >= 0 (negative = padding),
            on top of the other masks. Documents are contiguous, ascending runs of a row, so
            causal masks and windows count within a document. math, flex and flash (varlen)
            take it; te does not and is not chosen for packed calls.

    Returns:
        [b, s_q, h_q, d] in q's dtype.
    """
    name = select_backend(
        q,
        k,
        v,
        causal=causal,
        softcap=softcap,
        window=window,
        kv_padding_mask=kv_padding_mask,
        dropout_p=dropout_p,
        backend=backend,
        doc_ids=doc_ids,
    )
    extra = {} if doc_ids is None else {"doc_ids": doc_ids}  # back-ends that take packing
    return BACKENDS[name].forward(
        q,
        k,
        v,
        softmax_scale=softmax_scale,
        causal=causal,
        softcap=softcap,
        window=window,
        kv_padding_mask=kv_padding_mask,
        dropout_p=dropout_p,
        **extra,
    )
