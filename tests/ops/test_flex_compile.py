"""FlexAttention is compiled once: calls with new sequence lengths (each training step pads to
its own longest sample) reuse the compiled graph instead of recompiling (dynamo's graph
counter), with masks from the block-mask cache, and still equal the reference.

CPU forward only (flex has no CPU backward in torch 2.13); inductor's CPU compile makes this
a slow test. On CUDA the same compiled callable runs (gpu-marked attention tests)."""

import pytest
import torch

from mmcap.ops.attention import flex
from mmcap.ops.attention.math_ref import attention_ref

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not flex.HAVE_FLEX_ATTENTION, reason="no flex_attention"),
]


def _qkv(s_q: int, s_k: int, g: torch.Generator):
    def t(s, h):
        return torch.randn(1, s, h, 16, generator=g)

    return t(s_q, 4), t(s_k, 2), t(s_k, 2)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "kind, lengths",
    [
        # three lengths in the first bucket (<= 128), then one in the second (129..256)
        ("causal_softcap", [(16, 16), (40, 40), (72, 72), (136, 136)]),
        ("cross_padding", [(16, 24), (40, 56)]),
    ],
)
def test_new_lengths_do_not_recompile(kind, lengths):
    torch._dynamo.reset()
    flex._compiled_flex_attention.cache_clear()
    g = torch.Generator().manual_seed(0)
    counts = []
    for s_q, s_k in lengths:
        q, k, v = _qkv(s_q, s_k, g)
        mask = None
        if kind == "cross_padding":
            mask = torch.ones(1, s_k, dtype=torch.bool)
            mask[:, s_k - 5 :] = False
        feats = dict(
            causal=kind == "causal_softcap",
            softcap=50.0 if kind == "causal_softcap" else None,
            kv_padding_mask=mask,
        )
        out = flex.flex_forward(q, k, v, softmax_scale=0.25, **feats)
        ref = attention_ref(q, k, v, softmax_scale=0.25, **feats)
        # fp32 on CPU: both compute softmax in fp32; 1e-5 covers summation-order differences.
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        counts.append(_graphs())
    buckets = [(flex.bucket_length(s_q), flex.bucket_length(s_k)) for s_q, s_k in lengths]
    # One graph per bucket: new lengths inside a bucket add none (the old un-bucketed
    # torch.compile gave [1, 2, 2]: a recompile for the second length).
    expected = [counts[0] + len(set(buckets[: i + 1])) - 1 for i in range(len(lengths))]
    assert counts[0] >= 1 and counts == expected, (counts, buckets)
