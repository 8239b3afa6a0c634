"""The `flex` attention back-end: torch's FlexAttention, compiled once per process and length
bucket (sequence lengths padded up to a multiple of 128, padded keys masked; block masks cached
per shape, per-batch ones once per micro-batch for all layers), so training steps with new
lengths do not recompile.

Softcap is a `score_mod` (tanh), causal / sliding window / kv padding are a `BlockMask` built
from `AttnMaskSpec.allows`, so the mask semantics are the reference's, not a re-reading of
them. GQA uses `enable_gqa=True` (query head i reads kv head i // (h_q // h_kv), the same
order as HF `repeat_kv`). Chosen automatically on CUDA when flash-attn and TE cannot take a
call; on CPU only when forced, since its compile is slow and, in torch 2.13, flex has no CPU
backward (it refuses inputs that require grad).
"""

from __future__ import annotations

import collections
import functools
import weakref

import torch

from mmcap.ops.attention.math_ref import AttnMaskSpec, same_document

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    HAVE_FLEX_ATTENTION = True
except ImportError:  # torch < 2.5
    HAVE_FLEX_ATTENTION = False

__all__ = ["HAVE_FLEX_ATTENTION", "flex_forward", "is_available", "supports"]

_DEVICES = ("cuda", "cpu")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Non-padding block masks are cached per (s_q, s_k, causal, window, device); 64 covers every
# (layer kind x sequence length) combination a training or eval run uses.
_BLOCK_MASK_CACHE_SIZE = 64


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether flex_attention is importable and, if `device` is given, runs there.

    Args:
        device: device the call would run on; None checks installation only.
    """
    if not HAVE_FLEX_ATTENTION:
        return False, "torch.nn.attention.flex_attention not importable (torch < 2.5)"
    if device is not None and device.type not in _DEVICES:
        return False, f"flex back-end runs on {_DEVICES}, not {device.type}"
    return True, ""


def supports(
    q, k, v, *, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids=None
) -> tuple[bool, str]:
    """Whether this call's features are within what flex_attention does.

    Args:
        q, k, v, causal, softcap, window, kv_padding_mask, dropout_p, doc_ids: the call's
            `attention()` arguments (bshd tensors; see `registry.attention`).
    """
    if dropout_p > 0.0:
        return False, "flex_attention has no attention dropout"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} not in {_DTYPES}"
    if q.device.type != "cuda" and any(t.requires_grad for t in (q, k, v)):
        # torch 2.13 flex_attention._validate_device: "does not support backward on CPU"
        return False, f"flex_attention has no backward on {q.device.type} (inputs require grad)"
    return True, ""


# Sequence lengths are padded up to a multiple of flex_attention's default block size (128):
# every length of a bucket reuses one static compiled graph and one cached block mask, so a
# step whose batch pads to new lengths does not recompile (tests/ops/test_flex_compile.py
# counts dynamo's graphs). Padded keys are masked and wholly masked key blocks are skipped, so
# the padding costs no attention work beyond the partly filled last block flex computes anyway.
BUCKET = 128


def bucket_length(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`BUCKET`."""
    return -(-n // BUCKET) * BUCKET


@functools.cache
def _compiled_flex_attention():
    # One compiled callable per process; dynamic=False: shapes are bucketed (one static graph
    # per bucket, score_mod and mask kind; dynamo's automatic dynamic shapes are not needed, and
    # inductor's CPU lowering of symbolic flex shapes fails in torch 2.13).
    # Uncompiled flex_attention materialises full score matrices and warns; never use it.
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _softcap_score_mod(softcap: float):
    # One function object per softcap value, so dynamo guards see a stable closure.
    def score_mod(score, b, h, q_idx, kv_idx):
        # `score` already includes softmax_scale: HF Gemma-2 caps the scaled logits.
        return torch.tanh(score / softcap) * softcap

    return score_mod


@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def _static_block_mask(
    s_q: int, s_k: int, real_k: int, causal: bool, window: int | None, device: str
) -> "BlockMask":
    """Block mask of bucketed lengths ``s_q`` x ``s_k`` whose keys from ``real_k`` on are
    padding (cached per shape)."""
    spec = AttnMaskSpec(causal=causal, window=window)
    # A tensor, not a Python int: dynamo would specialise (and recompile) on a closed-over int.
    limit = torch.tensor(real_k, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.allows(q_idx, kv_idx) & (kv_idx < limit)

    return create_block_mask(mask_mod, None, None, s_q, s_k, device=device)


def _doc_block_mask(spec, s_q, s_k, doc_ids, kv_padding_mask, device) -> "BlockMask":
    """Document block mask of packed rows (per call): the bucket padding gets id -1, so it is
    never attended; whole blocks outside a query block's documents are skipped."""
    q_doc = torch.nn.functional.pad(doc_ids[0], (0, s_q - doc_ids[0].shape[1]), value=-1)
    kv = doc_ids[1]
    if kv_padding_mask is not None:
        kv = torch.where(kv_padding_mask, kv, torch.full_like(kv, -1))
    kv_doc = torch.nn.functional.pad(kv, (0, s_k - kv.shape[1]), value=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.allows(q_idx, kv_idx) & same_document(q_doc[b, q_idx], kv_doc[b, kv_idx])

    return create_block_mask(mask_mod, q_doc.shape[0], None, s_q, s_k, device=device)


# Per-batch block masks (kv padding, packed documents) are memoised on the identity of the
# tensors they are built from: every layer of a forward gets the same encoder mask / document
# ids, so a micro-batch builds its cross-attention mask once instead of once per layer (26-46
# create_block_mask calls per forward on the Gemma sizes). A hit needs the very same tensor
# objects, alive (weak references) and unmodified (``_version``); a few entries cover the
# micro-batches in flight.
_BATCH_MASK_CACHE_SIZE = 8
_batch_masks: collections.OrderedDict = collections.OrderedDict()


def _memoised_on_tensors(tensors: tuple, key: tuple, build) -> "BlockMask":
    """``build()``, reused while ``tensors`` (None or tensors) are the same live, unmodified
    objects and ``key`` (shapes, mask kind) is equal."""
    if any(t is not None and t.is_inference() for t in tensors):
        return build()  # inference-mode tensors have no version counter: no memo
    ident = tuple(None if t is None else (id(t), t._version) for t in tensors) + key
    hit = _batch_masks.get(ident)
    if hit is not None:
        refs, mask = hit
        same = (
            (r is None) if t is None else (r is not None and r() is t)
            for r, t in zip(refs, tensors)
        )
        if all(same):
            _batch_masks.move_to_end(ident)
            return mask
    mask = build()
    _batch_masks[ident] = (tuple(None if t is None else weakref.ref(t) for t in tensors), mask)
    while len(_batch_masks) > _BATCH_MASK_CACHE_SIZE:
        _batch_masks.popitem(last=False)
    return mask


def _block_mask(
    spec: AttnMaskSpec,
    s_q: int,
    s_k: int,
    real_k: int,
    device: torch.device,
    kv_padding_mask: torch.Tensor | None,
    doc_ids=None,
) -> "BlockMask":
    key = (s_q, s_k, real_k, spec.causal, spec.window, str(device))
    if doc_ids is not None:
        return _memoised_on_tensors(
            (*doc_ids, kv_padding_mask),
            key,
            lambda: _doc_block_mask(spec, s_q, s_k, doc_ids, kv_padding_mask, device),
        )
    if kv_padding_mask is None:
        return _static_block_mask(s_q, s_k, real_k, spec.causal, spec.window, str(device))
    return _memoised_on_tensors(
        (kv_padding_mask,),
        key,
        lambda: _padding_block_mask(spec, s_q, s_k, real_k, kv_padding_mask, device),
    )


def _padding_block_mask(spec, s_q, s_k, real_k, kv_padding_mask, device) -> "BlockMask":
    """Block mask of a batch's kv padding (B = batch, H broadcast), on bucketed keys."""
    pad = torch.nn.functional.pad(kv_padding_mask.bool(), (0, s_k - real_k), value=False)

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.allows(q_idx, kv_idx) & pad[b, kv_idx]

    return create_block_mask(mask_mod, pad.shape[0], None, s_q, s_k, device=device)


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """[b, s, h, d] -> [b, length, h, d] with zero rows at the end (no copy if s == length)."""
    if x.shape[1] == length:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))


# Under ``compile.enable`` (mmcap.model.compile) the layer's graph breaks around this call:
# the attention runs through the one standalone compiled flex_attention (static bucket shapes,
# memoised block masks) that the eager path uses, not inlined into the layer's graph with its
# block masks rebuilt per layer and dynamic lengths (inductor's CPU flex lowering fails there in
# torch 2.13; the standalone path is the one measured on an H200).
@torch.compiler.disable
def flex_forward(
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
    """Attention through compiled flex_attention; same contract as `attention_ref`.

    A query with no attendable key gets output 0: flex_attention returns 0 for rows whose
    block-mask row is empty (checked against the reference in tests/ops/test_attention.py).

    Args:
        q: [b, s_q, h_q, d].
        k: [b, s_k, h_kv, d].
        v: [b, s_k, h_kv, d].
        softmax_scale: multiplier on q @ k^T.
        causal: causal mask (s_q == s_k).
        softcap: Gemma-2 logit soft-cap, or None.
        window: sliding window (see `AttnMaskSpec`), or None.
        kv_padding_mask: bool [b, s_k], True = real key.
        dropout_p: must be 0 (flex has no dropout; the registry routes such calls elsewhere).
        doc_ids: packed rows' (q_doc, kv_doc) document ids (a document block mask), or None.

    Returns:
        [b, s_q, h_q, d] in q's dtype.
    """
    if dropout_p > 0.0:
        raise ValueError("flex back-end has no attention dropout; use backend='math'")
    spec = AttnMaskSpec(causal=causal, window=window)
    s_q, s_k = q.shape[1], k.shape[1]
    bq, bk = bucket_length(s_q), bucket_length(s_k)
    block_mask = _block_mask(spec, bq, bk, s_k, q.device, kv_padding_mask, doc_ids)
    score_mod = None if softcap is None else _softcap_score_mod(float(softcap))
    out = _compiled_flex_attention()(
        _pad_seq(q, bq).transpose(1, 2),  # [b, h_q, bq, d]
        _pad_seq(k, bk).transpose(1, 2),  # [b, h_kv, bk, d]
        _pad_seq(v, bk).transpose(1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)[:, :s_q]  # [b, s_q, h_q, d]
