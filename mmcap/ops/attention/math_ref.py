"""Attention semantics and the plain-PyTorch `math` back-end.

This file owns the contract every attention back-end implements:

* `AttnMaskSpec`: which keys a query may see (causal, sliding window), written once as a
  predicate that the dense reference mask and flex's `mask_mod` both call, plus the conversion
  to flash-attn / Transformer Engine `window_size` tuples.
* `check_attention_inputs`: shape, dtype and argument validation shared by all back-ends.
* `attention_ref`: the reference implementation, written to match Hugging Face Gemma-2's
  `eager_attention_forward` op for op (matmuls in the input dtype, softcap before masking,
  softmax in float32), so it doubles as "plain PyTorch in low precision" for the
  tolerance rule in STYLE.md rule 5.

Layout is flash-attn's "bshd": q [b, s_q, h_q, d], k and v [b, s_k, h_kv, d].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AttnMaskSpec",
    "attention_ref",
    "check_attention_inputs",
    "check_doc_ids",
    "is_available",
    "same_document",
    "supports",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttnMaskSpec:
    """Which keys each query may attend to, apart from per-example kv padding.

    Args:
        causal: query i attends key j only if j <= i. Top-left aligned, so only meaningful
            when s_q == s_k (`check_attention_inputs` enforces that).
        window: sliding window with Hugging Face Gemma-2 semantics (transformers
            `masking_utils.sliding_window_overlay`: `kv_idx > q_idx - sliding_window`): with
            `causal`, query i attends key j iff i - window < j <= i, i.e. `window` keys
            counting itself. Requires `causal=True`.
    """

    causal: bool = False
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is None:
            return
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(
                f"window={self.window!r}: must be a positive int, the number of keys a query "
                "sees counting itself (Gemma-2 `sliding_window`), or None for no window"
            )
        if not self.causal:
            raise ValueError(
                f"window={self.window} needs causal=True: the sliding window is defined on top "
                "of the causal mask (HF sliding_window_causal_mask_function); pass causal=True "
                "or window=None"
            )

    @property
    def is_full(self) -> bool:
        """True when every query may see every key (no causal mask, hence no window)."""
        return not self.causal

    def allows(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Bool tensor, True where query `q_idx` may attend key `kv_idx`.

        Works on broadcast index grids (dense mask) and on the scalar index tensors that
        flex_attention's `mask_mod` receives under vmap.

        Args:
            q_idx: query positions.
            kv_idx: key positions, broadcastable against `q_idx`.
        """
        ok = kv_idx >= 0  # all True, with the broadcast shape/device of kv_idx
        if self.causal:
            ok = ok & (kv_idx <= q_idx)
        if self.window is not None:
            ok = ok & (kv_idx > q_idx - self.window)
        return ok

    def dense(
        self,
        s_q: int,
        s_k: int,
        device: torch.device,
        kv_padding_mask: torch.Tensor | None = None,
        doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Bool mask [b or 1, 1, s_q, s_k], True = attend; None when nothing is masked.

        Args:
            s_q: query length.
            s_k: key length.
            device: device of the mask.
            kv_padding_mask: optional bool [b, s_k], True = real key.
            doc_ids: optional (q_doc [b, s_q], kv_doc [b, s_k]) of packed rows: a query
                attends only keys of its own document, never a key with a negative id.
        """
        mask = None
        if not self.is_full:
            q_idx = torch.arange(s_q, device=device)[:, None]
            kv_idx = torch.arange(s_k, device=device)[None, :]
            mask = self.allows(q_idx, kv_idx)[None, None]  # [1, 1, s_q, s_k]
        if kv_padding_mask is not None:
            pad = kv_padding_mask[:, None, None, :]  # [b, 1, 1, s_k]
            mask = pad if mask is None else mask & pad
        if doc_ids is not None:
            q_doc, kv_doc = doc_ids
            same = same_document(q_doc[:, None, :, None], kv_doc[:, None, None, :])
            mask = same if mask is None else mask & same
        return mask

    def flash_window_size(self) -> tuple[int, int]:
        """`window_size=(left, right)` for flash-attn and Transformer Engine.

        Both define local attention as "query i sees keys [i - left, i + right] inclusive"
        (s_q == s_k), with -1 meaning unbounded. Our `window` counts keys *including* i, so
        left = window - 1. Passing (window, 0) -- the classic converter off-by-one -- would
        let every query see window + 1 keys and silently differ from Gemma-2.
        """
        if self.window is None:
            return (-1, 0) if self.causal else (-1, -1)
        return (self.window - 1, 0)


def same_document(q_doc: torch.Tensor, kv_doc: torch.Tensor) -> torch.Tensor:
    """True where a query of document ``q_doc`` may see a key of document ``kv_doc``: the
    same id, and the key is not padding (id < 0). Broadcasts; works under flex's vmap."""
    return (q_doc == kv_doc) & (kv_doc >= 0)


def check_doc_ids(doc_ids, b: int, s_q: int, s_k: int, device: torch.device) -> None:
    """Validate the ``doc_ids=(q_doc, kv_doc)`` of a packed call (see `attention_ref`)."""
    if not (isinstance(doc_ids, (tuple, list)) and len(doc_ids) == 2):
        raise ValueError("doc_ids must be a pair (q_doc [b, s_q], kv_doc [b, s_k]) or None")
    for name, t, s in (("q_doc", doc_ids[0], s_q), ("kv_doc", doc_ids[1], s_k)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"doc_ids {name} must be an integer tensor")
        if tuple(t.shape) != (b, s):
            raise ValueError(f"doc_ids {name} must have shape {(b, s)}; got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"doc_ids {name} is on {t.device}, q on {device}")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softcap: float | None = None,
    window: int | None = None,
    kv_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> AttnMaskSpec:
    """Validate an attention call and return its mask spec; raise ValueError naming the problem.

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d], h_q % h_kv == 0.
        v: same shape as k.
        causal: causal mask; requires s_q == s_k.
        softcap: logit soft-cap, > 0, or None.
        window: sliding window (see `AttnMaskSpec`), or None.
        kv_padding_mask: bool [b, s_k], True = real key, or None.
        dropout_p: attention-probability dropout in [0, 1).
        doc_ids: (q_doc [b, s_q], kv_doc [b, s_k]) integer document ids of packed rows, or None.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, seq, heads, head_dim] (bshd); got {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)}, {tuple(v.shape)}")
    b, s_q, h_q, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim"
        )
    h_kv = k.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of kv heads ({h_kv}) for GQA/MQA")
    s_k = k.shape[1]
    if causal and s_q != s_k:
        raise ValueError(
            f"causal=True needs s_q == s_k (got {s_q} and {s_k}): back-ends disagree on how to "
            "align a causal mask otherwise (top-left here, bottom-right in flash-attn)"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be > 0, or None to disable it")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    if kv_padding_mask is not None:
        if kv_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"kv_padding_mask must be bool (True = real token); got {kv_padding_mask.dtype}"
            )
        if tuple(kv_padding_mask.shape) != (b, s_k):
            raise ValueError(
                f"kv_padding_mask must have shape [b, s_k] = {(b, s_k)}; "
                f"got {tuple(kv_padding_mask.shape)}"
            )
        if kv_padding_mask.device != q.device:
            raise ValueError(f"kv_padding_mask is on {kv_padding_mask.device}, q on {q.device}")
    if doc_ids is not None:
        check_doc_ids(doc_ids, b, s_q, s_k, q.device)
    return AttnMaskSpec(causal=causal, window=window)


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """The math back-end runs on every device.

    Args:
        device: device the call would run on; None checks installation only.
    """
    return True, ""


def supports(
    q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids=None
) -> tuple[bool, str]:
    """The math back-end supports every valid call.

    Args:
        q, k, v, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids: the call's
            `attention()` arguments (bshd tensors; see `registry.attention`).
    """
    return True, ""


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    softcap: float | None = None,
    window: int | None = None,
    kv_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference attention in plain PyTorch (the `math` back-end).

    Scores = (q @ k^T) * softmax_scale, then softcap * tanh(scores / softcap), then masks,
    softmax in float32 (float64 for float64 inputs), then @ v -- the op order of HF Gemma-2
    eager attention. A query whose every key is masked returns 0 (not NaN).

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d]; query head i uses kv head i // (h_q // h_kv).
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T (usually head_dim ** -0.5).
        causal: query i sees key j only if j <= i (needs s_q == s_k).
        softcap: Gemma-2 logit soft-cap, or None.
        window: sliding window, `window` keys counting the query itself (needs causal).
        kv_padding_mask: bool [b, s_k], True = real key, False = padding.
        dropout_p: dropout on attention probabilities (torch dropout; training only).
        doc_ids: packed rows (sequence packing): (q_doc [b, s_q], kv_doc [b, s_k]) integer
            document ids; query i attends key j only if q_doc[i] == kv_doc[j] >= 0 (on top of
            the causal / window / padding masks; a negative id is padding). Documents are
            contiguous runs of a row, so the causal mask and the window count within them.
        upcast: compute in float64 (high-precision reference); output stays float64.

    Returns:
        [b, s_q, h_q, d] in q's dtype (float64 if `upcast`).
    """
    spec = check_attention_inputs(
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
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # [b, h_q, s_q, d]
    # repeat_interleave == HF repeat_kv: query head i reads kv head i // groups
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [b, h_q, s_k, d]
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)  # [b, h_q, s_k, d]

    scores = torch.matmul(qh, kh.transpose(2, 3)) * softmax_scale  # [b, h_q, s_q, s_k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = spec.dense(q.shape[1], k.shape[1], q.device, kv_padding_mask, doc_ids)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype)
    if allowed is not None:
        # a row with no allowed key is softmax(all -inf) = NaN; define its output as 0
        probs = probs.masked_fill(~allowed, 0.0)
    probs = probs.to(vh.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vh)  # [b, h_q, s_q, d]
    return out.transpose(1, 2)
