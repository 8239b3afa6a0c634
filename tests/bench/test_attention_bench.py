"""The attention benchmark's FLOP counts and rows (CPU, math back-end, tiny shapes)."""

import pytest
import torch

from mmcap.bench.attention_bench import AttentionCase, attention_cases, run_attention_benchmark
from mmcap.train.flops import attended_keys


def test_attended_pairs_match_the_masks():
    # Count allowed (query, key) pairs of each case from an explicit mask.
    for case in attention_cases("tiny", batch=2, target=12, encoder=16):
        q = torch.arange(case.s_q)[:, None]
        k = torch.arange(case.s_k)[None, :]
        allowed = torch.ones(case.s_q, case.s_k, dtype=torch.bool)
        if case.causal:
            allowed &= k <= q
        if case.window is not None:
            allowed &= k > q - case.window
        allowed &= k < case.s_k - case.padded_keys
        assert case.attended_pairs() == case.batch * int(allowed.sum()), case.name
    big = attention_cases("2b", batch=1, target=8192, encoder=178)[0]
    assert big.window == 4096 and big.softcap == 50.0 and big.head_dim == 256
    assert big.attended_pairs() == attended_keys(8192, 4096)


def test_rows_for_the_math_backend():
    cases = attention_cases("tiny", batch=1, target=8, encoder=12)
    rows = run_attention_benchmark(cases, "cpu", torch.float32, iters=1, backends=["math"])
    assert [r["shape"] for r in rows] == [c.name for c in cases]
    for r, c in zip(rows, cases, strict=True):
        assert r["backend"] == "math" and "note" not in r, r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["tflops"] == pytest.approx(3 * c.forward_flops() / (r["fwd_bwd_ms"] / 1e3) / 1e12)


def test_a_backend_that_cannot_run_says_why():
    case = AttentionCase("x", 1, 8, 8, 2, 2, 16, causal=True, softcap=50.0)
    (row,) = run_attention_benchmark([case], "cpu", torch.float32, iters=1, backends=["flash"])
    assert row["note"].startswith("cannot run") and "tflops" not in row
