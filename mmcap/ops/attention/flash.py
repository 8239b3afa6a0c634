"""The `flash` attention back-end: flash-attn 2 (`flash_attn_func` / `flash_attn_varlen_func`).

Guarded by `HAVE_FLASH_ATTN`. Needs flash-attn >= 2.6.3 (logit `softcap=` arrived in 2.6.0,
transformers PR #31887; its backward was fixed in 2.6.2, axolotl PR #1781; 2.6.3 is the
first release both llm-foundry PR #1374 and this package require), a CUDA device of compute
capability >= 8.0 and fp16/bf16 inputs. Dense calls go to `flash_attn_func`; calls with a
kv padding mask (cross-attention to padded encoder output) unpad k/v and go to
`flash_attn_varlen_func`.

Not exercised on CPU: tests/ops/test_attention.py holds `gpu`-marked comparisons with the
math reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mmcap.ops.attention.math_ref import AttnMaskSpec

try:
    import flash_attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
    _IMPORT_ERROR = ""
except (ImportError, OSError) as e:  # OSError: a wheel built against another torch/CUDA
    HAVE_FLASH_ATTN = False
    _IMPORT_ERROR = (
        "flash-attn not installed"
        if getattr(e, "name", None) == "flash_attn"
        else f"flash-attn failed to import ({type(e).__name__}: {e})"
    )

__all__ = [
    "HAVE_FLASH_ATTN",
    "MIN_FLASH_ATTN_VERSION",
    "flash_forward",
    "is_available",
    "packed_varlen_layout",
    "supports",
]

MIN_FLASH_ATTN_VERSION = "2.6.3"
_DTYPES = (torch.float16, torch.bfloat16)
# flash-attn 2 kernels: "FlashAttention only supports Ampere GPUs or newer" and
# "head dimension at most 256" (checks in csrc/flash_attn/flash_api.cpp).
_MIN_CAPABILITY = (8, 0)
_MAX_HEAD_DIM = 256


@functools.cache  # checked on every call's back-end choice: parse the version once
def _version_ok() -> tuple[bool, str]:
    from packaging.version import Version

    version = getattr(flash_attn, "__version__", "0")
    if Version(version) < Version(MIN_FLASH_ATTN_VERSION):
        return False, (
            f"flash-attn {version} is older than {MIN_FLASH_ATTN_VERSION} (needs softcap= and its "
            f"backward); pip install 'flash-attn>={MIN_FLASH_ATTN_VERSION}'"
        )
    return True, ""


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether flash-attn is installed, new enough, and (if `device` given) usable there.

    Args:
        device: device the call would run on; None checks installation only.
    """
    if not HAVE_FLASH_ATTN:
        return False, _IMPORT_ERROR
    ok, why = _version_ok()
    if not ok:
        return False, why
    if device is not None:
        if device.type != "cuda":
            return False, f"flash-attn needs a CUDA device, not {device.type}"
        index = torch.cuda.current_device() if device.index is None else device.index
        if _capability(index) < _MIN_CAPABILITY:
            return False, f"flash-attn 2 needs compute capability >= {_MIN_CAPABILITY}"
    return True, ""


def supports(
    q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids=None
) -> tuple[bool, str]:
    """Whether flash-attn can run this call exactly.

    Args:
        q, k, v, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids: the call's
            `attention()` arguments (bshd tensors; see `registry.attention`).
    """
    if q.dtype not in _DTYPES:
        return False, f"flash-attn needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return False, f"flash-attn 2 head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if softcap is not None and dropout_p > 0.0:
        # flash_api.cpp: "Softcapping does not support dropout for now"
        return False, "flash-attn cannot combine softcap with dropout"
    if doc_ids is not None:
        if kv_padding_mask is not None:
            return False, "packed calls carry padding in doc_ids (id -1), not kv_padding_mask"
        return True, ""  # varlen over the documents: causal / window count within each
    if kv_padding_mask is not None and causal:
        # The varlen path packs each example's real keys, which renumbers key positions;
        # only position-free (non-causal, no window) attention survives that.
        return False, "flash back-end takes kv_padding_mask only for non-causal attention"
    return True, ""


def flash_forward(
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
    doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention through flash-attn; same contract as `attention_ref`.

    Args:
        q: [b, s_q, h_q, d], fp16/bf16 on CUDA.
        k: [b, s_k, h_kv, d]; flash-attn maps query head i to kv head i // (h_q // h_kv).
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T.
        causal: causal mask (s_q == s_k, so flash's bottom-right alignment equals top-left).
        softcap: Gemma-2 logit soft-cap, or None (flash-attn: 0.0 disables it).
        window: sliding window, passed as window_size=(window - 1, 0).
        kv_padding_mask: bool [b, s_k], True = real key; non-causal calls only.
        dropout_p: attention dropout probability.
        doc_ids: packed rows' (q_doc, kv_doc): each document is one varlen sequence
            (`flash_attn_varlen_func` with cu_seqlens from :func:`packed_varlen_layout`).

    Returns:
        [b, s_q, h_q, d] in q's dtype.
    """
    spec = AttnMaskSpec(causal=causal, window=window)
    kwargs = dict(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        # (window - 1, 0): `window` keys including the query itself -- see AttnMaskSpec.
        window_size=spec.flash_window_size(),
        softcap=0.0 if softcap is None else float(softcap),
    )
    if doc_ids is not None:
        return _varlen_packed(q, k, v, doc_ids, kwargs)
    if kv_padding_mask is None:
        return flash_attn_func(q, k, v, **kwargs)
    return _varlen_cross_attention(q, k, v, kv_padding_mask, kwargs)


def packed_varlen_layout(q_doc: torch.Tensor, kv_doc: torch.Tensor) -> dict:
    """The varlen layout of packed rows: every (row, document) pair is one sequence.

    Documents must be contiguous runs with ascending ids along each row (the packer's rows,
    :mod:`mmcap.data.packing`); ids < 0 are padding and belong to no sequence. The same
    (row, id) pair on both sides is one sequence pair, so cross-attention from decoder
    document i reaches encoder document i only.

    Returns:
        dict: ``q_index`` / ``kv_index`` (flat positions of real tokens, in sequence order),
        ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 [num_seq + 1]), ``max_seqlen_q`` /
        ``max_seqlen_k`` (ints), ``q_has_key`` (bool per kept query: its document has keys).
    """
    b = q_doc.shape[0]
    docs = int(torch.maximum(q_doc.max(), kv_doc.max()).clamp(min=0)) + 1  # host sync
    out = {}
    counts = {}
    for side, ids in (("q", q_doc), ("k", kv_doc)):
        flat = ids.reshape(-1)
        keep = (flat >= 0).nonzero(as_tuple=True)[0]
        rows = torch.div(keep, ids.shape[1], rounding_mode="floor")
        gid = rows * docs + flat[keep].long()  # ascending by construction
        n = torch.bincount(gid, minlength=b * docs)
        counts[side] = (gid, n)
        out[f"{'q' if side == 'q' else 'kv'}_index"] = keep
        out[f"cu_seqlens_{side}"] = F.pad(torch.cumsum(n, 0, dtype=torch.int32), (1, 0))
        out[f"max_seqlen_{side}"] = int(n.max()) if n.numel() else 0
    gid_q, _ = counts["q"]
    out["q_has_key"] = counts["k"][1][gid_q] > 0
    return out


def _varlen_packed(q, k, v, doc_ids, kwargs) -> torch.Tensor:
    """Packed rows through flash_attn_varlen_func: one sequence per (row, document)."""
    b, s_q, h_q, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    lay = packed_varlen_layout(*doc_ids)
    qi, ki = lay["q_index"], lay["kv_index"]
    out = flash_attn_varlen_func(
        q.reshape(b * s_q, h_q, d).index_select(0, qi),
        k.reshape(b * s_k, h_kv, d).index_select(0, ki),
        v.reshape(b * s_k, h_kv, d).index_select(0, ki),
        lay["cu_seqlens_q"],
        lay["cu_seqlens_k"],
        max(lay["max_seqlen_q"], 1),
        max(lay["max_seqlen_k"], 1),
        **kwargs,
    )
    out = torch.where(lay["q_has_key"].view(-1, 1, 1), out, torch.zeros_like(out))
    full = out.new_zeros(b * s_q, h_q, d).index_copy(0, qi, out)  # padding queries: 0
    return full.view(b, s_q, h_q, d)


def _varlen_cross_attention(q, k, v, kv_padding_mask, kwargs) -> torch.Tensor:
    """Non-causal attention to padded keys: pack the real keys, keep every query."""
    b, s_q, h_q, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    seqlens_k = kv_padding_mask.sum(dim=1, dtype=torch.int32)  # [b]
    cu_seqlens_k = F.pad(torch.cumsum(seqlens_k, dim=0, dtype=torch.int32), (1, 0))  # [b + 1]
    cu_seqlens_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
    # Host sync: nonzero's output size depends on the data.
    keep = kv_padding_mask.flatten().nonzero(as_tuple=True)[0]  # [total_k]
    k_packed = k.reshape(b * s_k, h_kv, d).index_select(0, keep)  # [total_k, h_kv, d]
    v_packed = v.reshape(b * s_k, h_kv, d).index_select(0, keep)
    out = flash_attn_varlen_func(
        q.reshape(b * s_q, h_q, d),
        k_packed,
        v_packed,
        cu_seqlens_q,
        cu_seqlens_k,
        s_q,
        # The padded length bounds every example's key count; passing it instead of
        # seqlens_k.max() avoids a second host sync. Kernels stop at each cu_seqlens_k end.
        s_k,
        **kwargs,
    ).reshape(b, s_q, h_q, d)
    # Examples with no real key: flash-attn documents an all-masked row as output 0; make it
    # explicit so the contract does not hang on the kernel's zero-length handling.
    has_key = (seqlens_k > 0).view(b, 1, 1, 1)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
