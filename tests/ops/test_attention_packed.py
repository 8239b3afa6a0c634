"""Packed rows (sequence packing) in mmcap.ops.attention: document masks (`doc_ids`) in the
math reference against attention run on every document separately; flex (CPU, forward) and
flash-attn's varlen call (emulated on CPU) against math; the registry's choice."""

import pytest
import torch

from mmcap.ops.attention import attention, attention_ref, select_backend
from mmcap.ops.attention.flex import HAVE_FLEX_ATTENTION
from tests.ops.test_attention import _flash_dense_emulator, _flash_varlen_emulator


def _doc_ids(lengths_per_row: list[list[int]], s: int) -> torch.Tensor:
    """int32 [b, s]: row r holds documents 0, 1, ... of the given lengths, then -1 padding."""
    out = torch.full((len(lengths_per_row), s), -1, dtype=torch.int32)
    for r, lengths in enumerate(lengths_per_row):
        pos = 0
        for d, n in enumerate(lengths):
            out[r, pos : pos + n] = d
            pos += n
        assert pos <= s
    return out


def _qkv(b, s_q, s_k, h_q, h_kv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype)
        for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv))
    ]


# Decoder documents (self-attention) and, per row, encoder documents of the same count.
DEC = [[5, 9, 3], [12, 4], [2]]
ENC = [[7, 3, 6], [4, 10], [9]]
S_DEC, S_ENC = 20, 18


def _per_document(q, k, v, q_doc, kv_doc, **kw):
    """Reference: each (row, document) attended on its own with attention_ref, scattered back;
    padding queries 0."""
    out = torch.zeros_like(q)
    for r in range(q.shape[0]):
        for doc in q_doc[r].unique().tolist():
            if doc < 0:
                continue
            qi = (q_doc[r] == doc).nonzero().flatten()
            ki = (kv_doc[r] == doc).nonzero().flatten()
            out[r, qi] = attention_ref(q[r : r + 1, qi], k[r : r + 1, ki], v[r : r + 1, ki], **kw)[0]
    return out


SELF_CASES = [
    ("causal_window_shorter_than_documents", dict(causal=True, window=4, softcap=5.0)),
    ("causal", dict(causal=True)),
    ("bidirectional", dict(causal=False)),
]


@pytest.mark.parametrize("name,kw", SELF_CASES, ids=[c[0] for c in SELF_CASES])
def test_math_self_attention_equals_each_document_alone(name, kw):
    q, k, v = (t.requires_grad_() for t in _qkv(3, S_DEC, S_DEC, 4, 2, 8))
    doc = _doc_ids(DEC, S_DEC)
    got = attention(q, k, v, softmax_scale=0.4, doc_ids=(doc, doc), backend="math", **kw)
    want = _per_document(q, k, v, doc, doc, softmax_scale=0.4, **kw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert torch.equal(got[doc < 0], torch.zeros_like(got[doc < 0]))
    # Gradients too (float64: only the summation order differs).
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_math_cross_attention_reaches_only_its_own_encoder_document():
    q, k, v = _qkv(3, S_DEC, S_ENC, 4, 4, 8)
    q_doc, kv_doc = _doc_ids(DEC, S_DEC), _doc_ids(ENC, S_ENC)
    got = attention(q, k, v, softmax_scale=0.4, causal=False, doc_ids=(q_doc, kv_doc))
    want = _per_document(q, k, v, q_doc, kv_doc, softmax_scale=0.4, causal=False)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # Changing encoder document 1 of row 0 changes only decoder document 1 of row 0.
    k2 = k.clone()
    k2[0, kv_doc[0] == 1] += 1.0
    moved = attention(q, k2, v, softmax_scale=0.4, causal=False, doc_ids=(q_doc, kv_doc))
    changed = (moved != got).any(-1).any(-1)
    assert torch.equal(changed, (q_doc == 1) & (torch.arange(3)[:, None] == 0))


def test_flash_varlen_packed_against_math(monkeypatch):
    """flash.py's varlen layout for packed rows, run through the emulator of the documented
    flash_attn_varlen_func (no GPU here): cu_seqlens, index order, window and padding."""
    from mmcap.ops.attention import flash

    monkeypatch.setattr(flash, "flash_attn_func", _flash_dense_emulator, raising=False)
    monkeypatch.setattr(flash, "flash_attn_varlen_func", _flash_varlen_emulator, raising=False)
    q, k, v = _qkv(3, S_DEC, S_DEC, 4, 2, 8, dtype=torch.float32)
    doc = _doc_ids(DEC, S_DEC)
    kw = dict(causal=True, window=4, softcap=5.0)
    got = flash.flash_forward(q, k, v, softmax_scale=0.4, doc_ids=(doc, doc), **kw)
    want = attention(q, k, v, softmax_scale=0.4, doc_ids=(doc, doc), backend="math", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    qc, kc, vc = _qkv(3, S_DEC, S_ENC, 4, 2, 8, dtype=torch.float32, seed=1)
    ids = (doc, _doc_ids(ENC, S_ENC))
    got = flash.flash_forward(qc, kc, vc, softmax_scale=0.4, causal=False, doc_ids=ids)
    want = attention(qc, kc, vc, softmax_scale=0.4, causal=False, doc_ids=ids, backend="math")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packed_varlen_layout():
    from mmcap.ops.attention.flash import packed_varlen_layout

    doc = _doc_ids(DEC, S_DEC)
    lay = packed_varlen_layout(doc, _doc_ids(ENC, S_ENC))
    # 6 sequences in (row, doc) order; rows are padded to 3 ids each (max id 2 + 1).
    seq_q = [n for row in DEC for n in row + [0] * (3 - len(row))]
    seq_k = [n for row in ENC for n in row + [0] * (3 - len(row))]
    assert lay["cu_seqlens_q"].tolist() == [0] + torch.tensor(seq_q).cumsum(0).tolist()
    assert lay["cu_seqlens_k"].tolist() == [0] + torch.tensor(seq_k).cumsum(0).tolist()
    assert lay["max_seqlen_q"] == 12 and lay["max_seqlen_k"] == 10
    assert lay["q_index"].tolist() == (doc.flatten() >= 0).nonzero().flatten().tolist()
    assert bool(lay["q_has_key"].all())


@pytest.mark.skipif(not HAVE_FLEX_ATTENTION, reason="torch has no flex_attention")
def test_flex_cpu_packed_matches_math():
    q, k, v = _qkv(3, S_DEC, S_DEC, 4, 2, 16, dtype=torch.float32)
    doc = _doc_ids(DEC, S_DEC)
    kw = dict(causal=True, window=4, softcap=5.0)
    got = attention(q, k, v, softmax_scale=0.3, doc_ids=(doc, doc), backend="flex", **kw)
    want = attention(q, k, v, softmax_scale=0.3, doc_ids=(doc, doc), backend="math", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # float32, as test_attention


def test_te_is_not_chosen_for_packed_calls_and_inputs_are_checked():
    from mmcap.ops.attention import te

    q, k, v = _qkv(3, S_DEC, S_DEC, 4, 2, 8, dtype=torch.float32)
    doc = _doc_ids(DEC, S_DEC)
    ok, why = te.supports(
        q, k, v, causal=True, softcap=None, window=None, kv_padding_mask=None, dropout_p=0.0,
        doc_ids=(doc, doc),
    )
    assert not ok and "doc_ids" in why
    assert select_backend(q, k, v, causal=True, doc_ids=(doc, doc)) == "math"
    with pytest.raises(ValueError, match="q_doc must have shape"):
        attention(q, k, v, softmax_scale=1.0, causal=True, doc_ids=(doc[:, :5], doc))
    with pytest.raises(ValueError, match="integer"):
        attention(q, k, v, softmax_scale=1.0, causal=True, doc_ids=(doc.float(), doc))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("cross", [False, True], ids=["self_causal_window", "cross"])
def test_gpu_packed_backend_matches_math_bf16(backend, cross):
    """flash (varlen over the documents) and flex (document block mask) on packed rows of
    Gemma-2-like heads, against math in bf16 and float64 (STYLE.md tolerance rule)."""
    from tests.ops.test_attention import _assert_grads_rule, assert_tolerance_rule

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dec = [[100, 37, 250, 60], [300, 200], [20, 20, 20, 20, 20]]
    enc = [[80, 50, 120, 64], [170, 190], [40, 41, 42, 43, 44]]
    s_q = 512
    s_k = 512 if not cross else 384
    q_doc = _doc_ids(dec, s_q).cuda()
    kv_doc = q_doc if not cross else _doc_ids(enc, s_k).cuda()
    q, k, v = (
        t.cuda().to(torch.bfloat16).requires_grad_()
        for t in _qkv(3, s_q, s_k, 8, 4, 128, seed=3)
    )
    kw = dict(causal=False) if cross else dict(causal=True, window=64, softcap=50.0)
    ids = (q_doc, kv_doc)
    try:
        select_backend(q, k, v, doc_ids=ids, backend=backend, **kw)
    except RuntimeError as e:
        pytest.skip(str(e))
    scale = 128**-0.5
    out = attention(q, k, v, softmax_scale=scale, doc_ids=ids, backend=backend, **kw)
    low = attention(q, k, v, softmax_scale=scale, doc_ids=ids, backend="math", **kw)
    ref = attention_ref(q, k, v, softmax_scale=scale, doc_ids=ids, upcast=True, **kw)
    assert_tolerance_rule(out, low, ref, what=f"{backend} packed")
    _assert_grads_rule(out, low, ref, (q, k, v), f"{backend} packed")
    pad = q_doc < 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
