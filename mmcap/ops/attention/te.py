"""The `te` attention back-end: Transformer Engine's `DotProductAttention`.

Guarded by `HAVE_TE`. TE picks its own kernel (cuDNN fused attention or its flash-attn
wrapper) and runs on CUDA in fp16/bf16. Calls are eligible only when TE computes exactly the
reference:

* no logit softcap (`DotProductAttention` has no softcap argument);
* no kv padding mask: TE turns "padding" masks into cu_seqlens assuming padding sits at the
  end of each row, and its handling of examples with zero real keys differs by kernel, so
  padded cross-attention goes to flash-attn (varlen) or flex instead;
* sliding windows as `window_size=(window - 1, 0)` on a top-left "causal" mask.

One `DotProductAttention` module (it holds no parameters) is cached per configuration.
Not exercised on CPU: tests/ops/test_attention.py holds `gpu`-marked comparisons.
"""

from __future__ import annotations

import functools
import inspect

import torch

from mmcap.ops.attention.math_ref import AttnMaskSpec

try:
    from transformer_engine.pytorch import DotProductAttention

    HAVE_TE = True
    _IMPORT_ERROR = ""
# TE's import fails with OSError/RuntimeError (missing CUDA libraries) as well as ImportError.
except (ImportError, OSError, RuntimeError) as e:
    HAVE_TE = False
    _IMPORT_ERROR = (
        "Transformer Engine not installed"
        if getattr(e, "name", None) == "transformer_engine"
        else f"Transformer Engine failed to import ({type(e).__name__}: {e})"
    )

__all__ = ["HAVE_TE", "is_available", "supports", "te_forward"]

_DTYPES = (torch.float16, torch.bfloat16)
# Constructor arguments this wrapper relies on; older TE releases lack some of them.
_REQUIRED_INIT_ARGS = (
    "num_gqa_groups",
    "qkv_format",
    "attn_mask_type",
    "window_size",
    "softmax_scale",
    "attention_type",
)


@functools.cache
def _missing_init_args() -> tuple[str, ...]:
    params = inspect.signature(DotProductAttention.__init__).parameters
    return tuple(a for a in _REQUIRED_INIT_ARGS if a not in params)


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether TE is importable, new enough, and (if `device` given) on CUDA.

    Args:
        device: device the call would run on; None checks installation only.
    """
    if not HAVE_TE:
        return False, _IMPORT_ERROR
    missing = _missing_init_args()
    if missing:
        return False, f"this Transformer Engine's DotProductAttention lacks {missing}; upgrade TE"
    if device is not None and device.type != "cuda":
        return False, f"Transformer Engine needs a CUDA device, not {device.type}"
    return True, ""


def supports(
    q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids=None
) -> tuple[bool, str]:
    """Whether TE computes exactly this call.

    Args:
        q, k, v, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids: the call's
            `attention()` arguments (bshd tensors; see `registry.attention`).
    """
    if doc_ids is not None:
        return False, "packed rows (doc_ids) unsupported: mmcap does not build TE's thd layout"
    if softcap is not None:
        return False, "softcap unsupported"
    if kv_padding_mask is not None:
        return False, "kv_padding_mask unsupported (TE padding masks assume right padding)"
    if q.dtype not in _DTYPES:
        return False, f"needs fp16/bf16, got {q.dtype}"
    return True, ""


@functools.lru_cache(maxsize=64)  # one entry per (layer kind, dropout) configuration
def _module(
    h_q: int,
    h_kv: int,
    d: int,
    softmax_scale: float,
    dropout_p: float,
    causal: bool,
    window: int | None,
    cross: bool,
) -> "DotProductAttention":
    spec = AttnMaskSpec(causal=causal, window=window)
    module = DotProductAttention(
        num_attention_heads=h_q,
        kv_channels=d,
        num_gqa_groups=h_kv,
        attention_dropout=dropout_p,
        qkv_format="bshd",
        # "causal" is top-left aligned in TE; with s_q == s_k it equals bottom-right anyway.
        attn_mask_type="causal" if causal else "no_mask",
        # TE: query i sees keys [i - left, i + right] inclusive; (window - 1, 0) = `window` keys.
        window_size=spec.flash_window_size(),
        softmax_scale=softmax_scale,
        attention_type="cross" if cross else "self",
    )
    # TE applies attention dropout only in training mode.
    return module.train(dropout_p > 0.0)


def te_forward(
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
) -> torch.Tensor:
    """Attention through TE `DotProductAttention`; same contract as `attention_ref`.

    Args:
        q: [b, s_q, h_q, d], fp16/bf16 on CUDA.
        k: [b, s_k, h_kv, d].
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T.
        causal: causal mask (s_q == s_k).
        softcap: must be None (see module docstring).
        window: sliding window, passed as window_size=(window - 1, 0).
        kv_padding_mask: must be None (see module docstring).
        dropout_p: attention dropout probability (TE's own RNG use; no Megatron RNG tracker).

    Returns:
        [b, s_q, h_q, d] in q's dtype.
    """
    if softcap is not None or kv_padding_mask is not None:
        raise ValueError("te back-end takes neither softcap nor kv_padding_mask (see te.py)")
    b, s_q, h_q, d = q.shape
    module = _module(
        h_q,
        k.shape[2],
        d,
        float(softmax_scale),
        float(dropout_p),
        causal,
        window,
        cross=s_q != k.shape[1],
    )
    out = module(q, k, v)  # bshd in, [b, s_q, h_q * d] out
    return out.reshape(b, s_q, h_q, d)
