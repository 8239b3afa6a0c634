"""The `sdpa` attention back-end: ``torch.nn.functional.scaled_dot_product_attention``, whose
dispatcher picks cuDNN, flash or memory-efficient kernels on CUDA (the math kernel elsewhere).

Eligible for calls without a logit soft-cap (SDPA has none): every BART self- and
cross-attention of the Florence sizes; not Gemma-2's soft-capped ones (flex takes those when
flash-attn is not installed). Packed rows (``doc_ids``) are left to flash-attn's varlen path
and flex's block-sparse document mask, which skip the cross-document blocks a dense SDPA mask
would compute.

Masks: a plain causal call uses ``is_causal`` (top-left aligned, s_q == s_k: the fused kernels
stay eligible); a window or kv padding becomes a boolean ``attn_mask`` from
:meth:`AttnMaskSpec.dense` (the reference's own mask). A query with no attendable key (an
all-padding example) gets output 0: its mask row is opened to every key so no kernel produces
NaN in forward or backward, and its output is zeroed (its gradient is then 0 as well).
GQA uses ``enable_gqa`` (query head i reads kv head i // (h_q // h_kv), as HF ``repeat_kv``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcap.ops.attention.math_ref import AttnMaskSpec

__all__ = ["is_available", "sdpa_forward", "supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """SDPA ships with torch (``enable_gqa`` since 2.5) and runs on every device.

    Args:
        device: device the call would run on; None checks installation only.
    """
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 5):
        return False, f"SDPA has no enable_gqa before torch 2.5 (torch {torch.__version__})"
    return True, ""


def supports(
    q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids=None
) -> tuple[bool, str]:
    """Whether SDPA computes exactly this call.

    Args:
        q, k, v, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids: the call's
            `attention()` arguments (bshd tensors; see `registry.attention`).
    """
    if softcap is not None:
        return False, "scaled_dot_product_attention has no logit softcap"
    if doc_ids is not None:
        return False, "packed rows go to flash varlen / flex (block-sparse document masks)"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} not in {_DTYPES}"
    return True, ""


def sdpa_forward(
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
    """Attention through SDPA; same contract as `attention_ref` (no softcap).

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d].
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T.
        causal: causal mask (s_q == s_k).
        softcap: must be None (the registry routes soft-capped calls elsewhere).
        window: sliding window (see `AttnMaskSpec`), or None.
        kv_padding_mask: bool [b, s_k], True = real key.
        dropout_p: attention dropout probability.

    Returns:
        [b, s_q, h_q, d] in q's dtype.
    """
    if softcap is not None:
        raise ValueError("sdpa back-end has no logit softcap; use backend='flex' or 'math'")
    spec = AttnMaskSpec(causal=causal, window=window)
    s_q, s_k = q.shape[1], k.shape[1]
    plain_causal = causal and window is None and kv_padding_mask is None
    mask = None if plain_causal else spec.dense(s_q, s_k, q.device, kv_padding_mask)
    has_key = None
    if mask is not None:
        has_key = mask.any(-1, keepdim=True)  # [b or 1, 1, s_q, 1]
        mask = mask | ~has_key  # a row with no key attends everything; zeroed below
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=plain_causal,
        scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [b, h_q, s_q, d]
    if has_key is not None:  # no host sync: always applied
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)
