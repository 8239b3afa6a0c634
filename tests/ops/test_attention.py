"""Tests for mmcap.ops.attention: `math` against an independent float64 loop implementation
and HF Gemma-2 eager attention; flex (CPU), flash-attn calls (emulated), registry; GPU back-ends
against `math` under the STYLE.md tolerance rule."""

import logging

import pytest
import torch

from mmcap.ops.attention import (
    ENV_VAR,
    AttnMaskSpec,
    attention,
    attention_ref,
    available_backends,
    registry,
    select_backend,
)
from mmcap.ops.attention.flex import HAVE_FLEX_ATTENTION

# float64 vs float64, different summation order: ~1e-16 relative rounding per op over a few
# dozen ops per output, so 1e-10 has ~1e4x headroom yet is far below any masking/softcap bug.
F64_TOL = 1e-10


# ---------------------------------------------------------------- independent reference
def _naive_attention(q, k, v, *, scale, causal=False, window=None, softcap=None, pad=None):
    """Straight-line float64 attention: for each (batch, head, query) list the keys it may see."""
    b, s_q, h_q, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    rows = []
    for bi in range(b):
        for hi in range(h_q):
            kv_head = hi // (h_q // h_kv)  # HF repeat_kv order
            for i in range(s_q):
                keys = [
                    j
                    for j in range(s_k)
                    if (not causal or j <= i)
                    and (window is None or j > i - window)  # HF sliding_window_overlay
                    and (pad is None or bool(pad[bi, j]))
                ]
                if not keys:
                    rows.append(torch.zeros(d, dtype=torch.float64))
                    continue
                qi = q[bi, i, hi].double()
                s = torch.stack([(qi * k[bi, j, kv_head].double()).sum() for j in keys]) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.exp(s - s.max())
                p = p / p.sum()
                rows.append((p[:, None] * v[bi, keys, kv_head].double()).sum(0))
    return torch.stack(rows).view(b, h_q, s_q, d).transpose(1, 2)


def _inputs(b, s_q, s_k, h_q, h_kv, d, dtype=torch.float64, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        scale * torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
        for s, h in ((s_q, h_q), (s_k, h_kv), (s_k, h_kv))
    )
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


# (name, shape (b, s_q, s_k, h_q, h_kv, d), kwargs)
CASES = [
    ("causal", (2, 10, 10, 2, 2, 8), dict(causal=True)),
    ("causal_window", (2, 10, 10, 2, 2, 8), dict(causal=True, window=4)),
    ("gqa_window_softcap", (2, 10, 10, 4, 2, 8), dict(causal=True, window=3, softcap=2.0)),
    ("mqa", (1, 9, 9, 4, 1, 8), dict(causal=True)),
    ("full_no_mask", (2, 8, 8, 2, 2, 8), dict(causal=False)),
    ("cross_sq_ne_sk", (2, 5, 11, 4, 2, 8), dict(causal=False, softcap=3.0)),
    ("cross_padding", (3, 5, 11, 4, 2, 8), dict(causal=False, pad=True)),
    ("causal_window_padding", (2, 10, 10, 4, 2, 8), dict(causal=True, window=4, pad=True)),
]


def _split(kwargs, b, s_k):
    """Case kwargs -> (attention kwargs, kv padding mask or None)."""
    kw = dict(kwargs)
    if not kw.pop("pad", False):
        return kw, None
    pad = torch.ones(b, s_k, dtype=torch.bool)
    pad[0, s_k - 3 :] = False  # right padding
    pad[0, 1] = False  # and a hole
    pad[1, :] = False  # an example with no real key at all
    return kw, pad


# ---------------------------------------------------------------- math back-end semantics
@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_math_matches_naive_forward_backward(name, shape, kwargs):
    b, s_q, s_k, h_q, h_kv, d = shape
    kw, pad = _split(kwargs, b, s_k)
    scale = d**-0.5
    q, k, v = _inputs(*shape)
    out = attention(q, k, v, softmax_scale=scale, kv_padding_mask=pad, backend="math", **kw)
    ref = _naive_attention(q, k, v, scale=scale, pad=pad, **kw)
    assert out.shape == (b, s_q, h_q, d) and out.dtype == q.dtype and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=F64_TOL, rtol=0)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want, n in zip(got, want, "qkv"):
        assert not g_got.isnan().any(), f"NaN in d{n}"
        torch.testing.assert_close(g_got, g_want, atol=F64_TOL, rtol=0, msg=f"d{n} ({name})")
    if pad is not None:  # an example with no real key: output exactly 0 (not NaN), dq 0
        empty = ~pad.any(1)
        assert empty.any() and not out[empty].any() and not got[0][empty].any()


def test_window_boundary_keys():
    """Query i sees key i - window + 1 and not key i - window (Gemma-2 `sliding_window`)."""
    s, window = 9, 3
    q = torch.zeros(1, s, 1, s, dtype=torch.float64)  # all scores 0 -> uniform over seen keys
    v = torch.eye(s, dtype=torch.float64)[None, :, None, :]  # value of key j = e_j
    out = attention(q, v, v, softmax_scale=1.0, causal=True, window=window, backend="math")[0, :, 0]
    for i in range(window, s):
        assert out[i, i - window + 1] == pytest.approx(1 / window)
        assert out[i, i - window] == 0.0
        assert out[i, i] == pytest.approx(1 / window)
    assert out[0, 0] == 1.0  # the first query sees only itself


def test_math_dropout_is_inverted_dropout():
    """Query 0 sees one key and v = 1, so it outputs 0 (dropped) or 1 / (1 - p) = 2 (kept)."""
    q, k, v = _small()
    torch.manual_seed(0)
    kw = dict(softmax_scale=0.3, causal=True, dropout_p=0.5, backend="math")
    out = torch.stack([attention(q, k, torch.ones_like(v), **kw)[0, 0] for _ in range(20)])
    assert set(out.unique().tolist()) == {0.0, 2.0}


# ---------------------------------------------------------------- parity with Hugging Face
def test_math_matches_hf_gemma2_eager_sliding_window():
    """Window semantics tied to transformers' own mask builder and Gemma-2 eager attention."""
    from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    b, s, h_q, h_kv, d, window, softcap = 2, 12, 4, 2, 8, 4, 5.0
    q, k, v = (t.detach() for t in _inputs(b, s, s, h_q, h_kv, d, dtype=torch.float32, scale=3.0))
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[0, 5] = False
    pad[1, [2, 3]] = False  # no query loses all of its window (HF would not give 0 there)
    assert AttnMaskSpec(True, window).dense(s, s, q.device, pad).any(-1).all()

    hf_mask = eager_mask(
        batch_size=b,
        q_length=s,
        kv_length=s,
        attention_mask=pad,
        dtype=torch.float32,
        mask_function=sliding_window_causal_mask_function(window),
    )  # [b, 1, s, s] additive: 0 or finfo.min
    module = torch.nn.Module().eval()
    module.num_key_value_groups = h_q // h_kv
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # HF takes bhsd
    hf_out, _ = eager_attention_forward(
        module, q_, k_, v_, hf_mask, dropout=0.0, scaling=d**-0.5, softcap=softcap
    )
    out = attention(
        q,
        k,
        v,
        softmax_scale=d**-0.5,
        causal=True,
        window=window,
        softcap=softcap,
        kv_padding_mask=pad,
        backend="math",
    )
    # Same op order as HF; -inf fill vs finfo.min add both exp() to exactly 0 (measured: bitwise
    # equal on torch 2.13 CPU). 1e-6 only absorbs ulp-level BLAS differences; window +-1 is off
    # by ~10 here, so the check pins the boundary.
    torch.testing.assert_close(out, hf_out, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- tolerance rule (STYLE.md rule 5)
def assert_tolerance_rule(out, out_lowp, ref, what="out"):
    """STYLE.md rule 5, as in flash-attention's tests/test_flash_attn.py: the kernel's error vs
    the high-precision reference is <= 2x plain PyTorch's error in the same low precision, plus
    an atol of twice the rounding of ref in that dtype ((ref + 0.3 - 0.3) - ref)."""
    ref = ref.to(out.dtype)
    atol = 2 * (ref + 0.3 - 0.3 - ref).abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    base = (out_lowp.float() - ref.float()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x {base:.3g} + {atol:.3g}"


def _assert_grads_rule(out, low, ref, inputs, what):
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    base = torch.autograd.grad(low, inputs, grad.to(low.dtype))
    want = torch.autograd.grad(ref, inputs, grad)
    for g_got, g_base, g_want, n in zip(got, base, want, "qkv"):
        assert not g_got.isnan().any(), f"{what} d{n} has NaN"
        assert_tolerance_rule(g_got, g_base, g_want, what=f"{what} d{n}")


def _naive_lowp(q, k, v, *, scale, causal, window, softcap):
    """Everything in the input dtype, softmax included: the crudest plain-PyTorch version."""
    g = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2).repeat_interleave(r, 1) for t, r in ((q, 1), (k, g), (v, g)))
    s = (qh @ kh.transpose(2, 3)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    allowed = AttnMaskSpec(causal, window).dense(s.shape[2], s.shape[3], q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(1, 2)


def test_math_bf16_within_tolerance_rule():
    """The bf16 math path (fp32 softmax, like HF) is no worse than all-bf16 PyTorch, fwd and bwd."""
    kw = dict(causal=True, window=5, softcap=4.0)
    q, k, v = _inputs(2, 24, 24, 4, 2, 16, dtype=torch.bfloat16)
    out = attention(q, k, v, softmax_scale=0.25, backend="math", **kw)
    ref = attention_ref(q, k, v, softmax_scale=0.25, upcast=True, **kw)
    low = _naive_lowp(q, k, v, scale=0.25, **kw)
    assert_tolerance_rule(out, low, ref)
    _assert_grads_rule(out, low, ref, (q, k, v), "math bf16")


# ---------------------------------------------------------------- flex on CPU (forced)
FLEX_CASES = [
    ("causal_window_softcap_gqa", (2, 40, 40, 4, 2, 16), dict(causal=True, window=7, softcap=5.0)),
    ("cross_padding_gqa", (2, 40, 24, 4, 2, 16), dict(causal=False, pad=True)),
]


@pytest.fixture(scope="module")
def flex_outputs():
    """Run each flex case once (compiled once per process, module-level cache in flex.py)."""
    if not HAVE_FLEX_ATTENTION:
        pytest.skip("torch has no flex_attention")
    results = {}
    for name, shape, kwargs in FLEX_CASES:
        kw, pad = _split(kwargs, shape[0], shape[2])
        q, k, v = (t.detach().float() for t in _inputs(*shape, dtype=torch.float32))
        got = attention(q, k, v, softmax_scale=0.3, kv_padding_mask=pad, backend="flex", **kw)
        want = attention(q, k, v, softmax_scale=0.3, kv_padding_mask=pad, backend="math", **kw)
        results[name] = (got, want, pad)
    return results


@pytest.mark.parametrize("name", [c[0] for c in FLEX_CASES])
def test_flex_cpu_matches_math(flex_outputs, name):
    got, want, pad = flex_outputs[name]
    assert not got.isnan().any()
    # Both float32, different summation order; measured max diff 1.6e-6 on these inputs
    # (|out| up to ~4, torch 2.13 CPU), so 1e-5 keeps ~6x headroom and sits far below what a
    # masking or softcap bug produces (~1e-1 and up).
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if pad is not None:
        fully_masked = ~pad.any(1)
        assert fully_masked.any()
        assert torch.equal(got[fully_masked], torch.zeros_like(got[fully_masked]))


# ---------------------------------------------------------------- flash-attn calls, emulated on CPU
def _flash_varlen_emulator(
    q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size, softcap
):
    """flash_attn_varlen_func as its docstring defines it, per sequence: query i sees keys
    [i + s_k - s_q - left, i + s_k - s_q + right] (causal: right = 0; -1 = unbounded),
    softcap 0 = off, kv head of query head h is h // (h_q // h_kv), an all-masked row is 0."""
    outs = []
    for n in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[n] : cu_q[n + 1]], k[cu_k[n] : cu_k[n + 1]], v[cu_k[n] : cu_k[n + 1]]
        left, right = window_size[0], 0 if causal else window_size[1]
        i = torch.arange(len(qs))[:, None] + len(ks) - len(qs)
        j = torch.arange(len(ks))[None, :]
        ok = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
        rep = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        sc = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        sc = softcap * torch.tanh(sc / softcap) if softcap > 0 else sc
        p = torch.softmax(sc.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
    return torch.cat(outs)


def _flash_dense_emulator(q, k, v, **kw):
    b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q, cu_k = torch.arange(b + 1) * s_q, torch.arange(b + 1) * s_k
    flat = (t.flatten(0, 1) for t in (q, k, v))
    return _flash_varlen_emulator(*flat, cu_q, cu_k, s_q, s_k, **kw).view(q.shape)


@pytest.mark.parametrize("name", ["causal_window_softcap_gqa", "cross_padding_gqa"])
def test_flash_arguments_against_flash_semantics(monkeypatch, name):
    """flash.py's window_size / softcap / varlen packing, run through an emulator of the
    documented flash-attn API (no GPU here): catches the (window, 0) off-by-one on CPU."""
    from mmcap.ops.attention import flash

    monkeypatch.setattr(flash, "flash_attn_func", _flash_dense_emulator, raising=False)
    monkeypatch.setattr(flash, "flash_attn_varlen_func", _flash_varlen_emulator, raising=False)
    _, shape, kwargs = next(c for c in FLEX_CASES if c[0] == name)
    kw, pad = _split(kwargs, shape[0], shape[2])
    q, k, v = (t.detach() for t in _inputs(*shape, dtype=torch.float32))
    got = flash.flash_forward(q, k, v, softmax_scale=0.3, kv_padding_mask=pad, **kw)
    want = attention(q, k, v, softmax_scale=0.3, kv_padding_mask=pad, backend="math", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # float32 vs float32, as flex


# ---------------------------------------------------------------- registry
@pytest.fixture
def fresh_registry_log(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "_logged_choices", set())


def _small(dtype=torch.float32):
    return [t.detach() for t in _inputs(1, 6, 6, 2, 1, 8, dtype=dtype)]


def test_cpu_auto_choice_and_forcing(fresh_registry_log):
    q, k, v = _small()
    assert select_backend(q, k, v, causal=True, softcap=2.0, window=3) == "math"
    assert available_backends("cpu") == ["math", "flex", "sdpa"]  # flash / te need CUDA
    with pytest.raises(RuntimeError, match="'flash' forced by backend='flash'"):
        attention(q, k, v, softmax_scale=0.3, causal=True, backend="flash")
    with pytest.raises(ValueError, match="unknown attention back-end 'cudnn'"):
        attention(q, k, v, softmax_scale=0.3, causal=True, backend="cudnn")
    with pytest.raises(RuntimeError, match="'sdpa' forced by backend='sdpa'.*softcap"):
        attention(q, k, v, softmax_scale=0.3, causal=True, softcap=2.0, backend="sdpa")
    with pytest.raises(RuntimeError, match="no attention dropout"):
        select_backend(q, k, v, causal=True, dropout_p=0.1, backend="flex")
    with pytest.raises(RuntimeError, match="no backward on cpu"):  # torch 2.13 flex on CPU
        select_backend(q.requires_grad_(), k, v, causal=True, backend="flex")


def test_env_var_overrides(fresh_registry_log, monkeypatch):
    q, k, v = _small()
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(RuntimeError, match=f"forced by {ENV_VAR}=flash"):
        select_backend(q, k, v, causal=True)
    monkeypatch.setenv(ENV_VAR, "flex")
    assert select_backend(q, k, v, causal=True) == "flex"
    monkeypatch.setenv(ENV_VAR, "math")
    assert select_backend(q, k, v, causal=True, backend="flex") == "math"  # env wins


def test_choice_logged_once_with_reason(fresh_registry_log, monkeypatch, caplog):
    q, k, v = _small()
    with caplog.at_level(logging.INFO, logger="mmcap.ops.attention"):
        for _ in range(3):
            attention(q, k, v, softmax_scale=0.3, causal=True, backend="math")
            attention(q, k, v, softmax_scale=0.3, causal=True)
        # the CUDA order replayed on CPU: flash and te are skipped, with their reasons
        monkeypatch.setattr(registry, "AUTO_ORDER_OTHER", registry.AUTO_ORDER_CUDA)
        assert select_backend(q, k, v, causal=True, softcap=2.0) == "flex"
    msgs = [r.getMessage() for r in caplog.records if r.name == "mmcap.ops.attention"]
    assert msgs[:2] == [
        "attention back-end: math (forced by backend='math')",
        "attention back-end: math (cpu: automatic choice is math only; "
        f"force flex with backend='flex' or {ENV_VAR}=flex)",
    ]
    assert len(msgs) == 3 and msgs[2].startswith("attention back-end: flex (flash: ")
    assert "; te: " in msgs[2]


_MASK5, _MASK_F = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 6)
BAD_CALLS = [  # (q shape, k/v shape, k dtype, keyword overrides, expected ValueError text)
    ((6, 2, 8), (1, 6, 1, 8), torch.float32, {}, "4-D"),
    ((1, 6, 2, 8), (1, 6, 3, 8), torch.float32, {}, "multiple of kv heads"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float64, {}, "share a dtype"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float32, {"kv_padding_mask": _MASK5}, r"\[b, s_k\]"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float32, {"kv_padding_mask": _MASK_F}, "must be bool"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float32, {"causal": False, "window": 3}, "causal=True"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float32, {"window": 0}, "positive int"),
    ((1, 4, 2, 8), (1, 6, 1, 8), torch.float32, {}, "s_q == s_k"),
    ((1, 6, 2, 8), (1, 6, 1, 8), torch.float32, {"softcap": 0.0}, "softcap"),
]


@pytest.mark.parametrize("q_shape,kv_shape,k_dtype,overrides,match", BAD_CALLS)
def test_input_validation(q_shape, kv_shape, k_dtype, overrides, match):
    q, k, v = torch.zeros(q_shape), torch.zeros(kv_shape, dtype=k_dtype), torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, softmax_scale=0.3, **{"causal": True, **overrides})


# ---------------------------------------------------------------- sdpa (CPU, forced)
SDPA_CASES = [c for c in CASES if "softcap" not in c[2]]


@pytest.mark.parametrize("name,shape,kwargs", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_matches_naive_forward_backward(name, shape, kwargs):
    """torch's scaled_dot_product_attention (CPU kernels, float64) against the independent
    loop: masks, GQA, an example with no real key (0 out, 0 gradients, no NaN)."""
    b, s_q, s_k, h_q, h_kv, d = shape
    kw, pad = _split(kwargs, b, s_k)
    scale = d**-0.5
    q, k, v = _inputs(*shape)
    out = attention(q, k, v, softmax_scale=scale, kv_padding_mask=pad, backend="sdpa", **kw)
    ref = _naive_attention(q, k, v, scale=scale, pad=pad, **kw)
    torch.testing.assert_close(out, ref, atol=F64_TOL, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want, n in zip(got, want, "qkv"):
        assert not g_got.isnan().any(), f"NaN in d{n}"
        torch.testing.assert_close(g_got, g_want, atol=F64_TOL, rtol=0, msg=f"d{n} ({name})")


def test_sdpa_takes_only_calls_without_softcap_or_packing():
    from mmcap.ops.attention import sdpa

    q, k, v = _small()
    common = dict(causal=True, window=None, kv_padding_mask=None, dropout_p=0.0)
    assert sdpa.supports(q, k, v, softcap=None, **common) == (True, "")
    assert not sdpa.supports(q, k, v, softcap=50.0, **common)[0]
    doc = torch.zeros(1, 6, dtype=torch.int32)
    assert not sdpa.supports(q, k, v, softcap=None, doc_ids=(doc, doc), **common)[0]
    # On CUDA it comes before flex, so BART attention (no cap) gets the fused SDPA kernels and
    # soft-capped Gemma-2 calls fall through to flex when flash-attn is not installed.
    order = registry.AUTO_ORDER_CUDA
    assert order.index("sdpa") < order.index("flex")


# ---------------------------------------------------------------- GPU back-ends (bf16)
GPU_CASES = [
    (
        "causal_window_softcap_gqa",
        (2, 256, 256, 8, 2, 64),
        dict(causal=True, window=64, softcap=50.0),
    ),
    ("causal_window_gqa", (2, 256, 256, 8, 2, 64), dict(causal=True, window=100)),
    ("cross_padding", (3, 77, 300, 8, 8, 64), dict(causal=False, pad=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "te", "flex", "sdpa"])
@pytest.mark.parametrize("shape,kwargs", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_gpu_backend_matches_math_bf16(backend, shape, kwargs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw, pad = _split(kwargs, shape[0], shape[2])
    pad = None if pad is None else pad.cuda()
    q, k, v = (
        t.detach().cuda().requires_grad_() for t in _inputs(*shape, dtype=torch.bfloat16, scale=1.0)
    )
    scale = shape[-1] ** -0.5
    try:  # not installed, or this case is outside the back-end's features (te: softcap, padding)
        select_backend(q, k, v, kv_padding_mask=pad, backend=backend, **kw)
    except RuntimeError as e:
        pytest.skip(str(e))
    out = attention(q, k, v, softmax_scale=scale, kv_padding_mask=pad, backend=backend, **kw)
    low = attention(q, k, v, softmax_scale=scale, kv_padding_mask=pad, backend="math", **kw)
    ref = attention_ref(q, k, v, softmax_scale=scale, kv_padding_mask=pad, upcast=True, **kw)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert_tolerance_rule(out, low, ref, what=backend)
    _assert_grads_rule(out, low, ref, (q, k, v), backend)
    if pad is not None:
        fully_masked = ~pad.any(1)
        assert torch.equal(out[fully_masked], torch.zeros_like(out[fully_masked]))
