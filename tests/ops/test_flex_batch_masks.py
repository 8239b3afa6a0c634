"""FlexAttention's per-batch block masks (kv padding, packed documents) are built once per
micro-batch and reused by every layer: memoised on the identity of the mask tensors, rebuilt
when a tensor is modified in place or is another object. No compile needed: the block masks
are checked element by element through their mask_mod, and the model-level count runs flex
eagerly (forward only, as on CPU flex has no backward)."""

import gc

import pytest
import torch

from mmcap.ops.attention import flex
from mmcap.ops.attention.math_ref import AttnMaskSpec

pytestmark = pytest.mark.skipif(not flex.HAVE_FLEX_ATTENTION, reason="no flex_attention")


@pytest.fixture
def builds(monkeypatch):
    """Counts create_block_mask calls; starts from an empty per-batch cache."""
    flex._batch_masks.clear()
    calls = []
    real = flex.create_block_mask

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(flex, "create_block_mask", counting)
    yield calls
    flex._batch_masks.clear()


def _dense(block_mask, b, s_q, s_k):
    """The element mask [b, s_q, s_k] a block mask's mask_mod allows."""
    q = torch.arange(s_q).view(1, s_q, 1)
    k = torch.arange(s_k).view(1, 1, s_k)
    rows = [block_mask.mask_mod(torch.tensor(i), 0, q, k) for i in range(b)]
    return torch.stack([torch.broadcast_to(r, (1, s_q, s_k))[0] for r in rows])


def _padding(lengths, s):
    return torch.arange(s).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_padding_mask_is_built_once_per_tensor_and_follows_changes(builds):
    spec = AttnMaskSpec(causal=False, window=None)
    mask = _padding([3, 5], 6)
    a = flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), mask)
    b = flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), mask)
    assert a is b and len(builds) == 1
    expect = mask.unsqueeze(1).expand(2, 128, 6)
    assert torch.equal(_dense(a, 2, 128, 6), expect)

    mask[0, 4] = True  # in place: _version changes, the mask must follow
    c = flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), mask)
    assert c is not a and len(builds) == 2
    assert bool(_dense(c, 2, 128, 6)[0, 0, 4])

    same_values = mask.clone()  # another object: its own entry
    flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), same_values)
    assert len(builds) == 3
    # another shape / mask kind on the same tensor is another entry
    causal = AttnMaskSpec(causal=True, window=None)
    flex._block_mask(causal, 128, 128, 6, torch.device("cpu"), mask)
    assert len(builds) == 4


def test_a_dead_tensor_never_serves_a_new_one(builds):
    spec = AttnMaskSpec(causal=False, window=None)
    for lengths in ([1, 6], [6, 1], [2, 2], [4, 3]):
        # the previous mask is freed: a new tensor may get its id (and _version 0)
        gc.collect()
        mask = _padding(lengths, 6)
        bm = flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), mask)
        assert torch.equal(_dense(bm, 2, 128, 6)[:, 0], mask), lengths
        del mask, bm
    assert len(builds) == 4


def test_inference_tensors_are_not_memoised(builds):
    """Inference-mode tensors have no version counter: built per call, still correct."""
    spec = AttnMaskSpec(causal=False, window=None)
    with torch.inference_mode():
        mask = _padding([2, 6], 6)
        for _ in range(2):
            bm = flex._block_mask(spec, 128, 128, 6, torch.device("cpu"), mask)
    assert len(builds) == 2
    assert torch.equal(_dense(bm, 2, 128, 6)[:, 0], mask)


def test_document_masks_are_memoised_too(builds):
    spec = AttnMaskSpec(causal=True, window=None)
    q_doc = torch.tensor([[0, 0, 1, 1, -1]])
    a = flex._block_mask(spec, 128, 128, 5, torch.device("cpu"), None, (q_doc, q_doc))
    b = flex._block_mask(spec, 128, 128, 5, torch.device("cpu"), None, (q_doc, q_doc))
    assert a is b and len(builds) == 1
    dense = _dense(a, 1, 5, 5)[0]
    assert bool(dense[3, 2]) and not bool(dense[2, 1]) and not bool(dense[1, 2])


def test_model_forward_builds_one_cross_attention_mask(
    builds, monkeypatch, single_rank_parallel_state
):
    """debug-gemma forward with flex forced (eager flex_attention, forward only): the encoder
    mask's block mask is built once for the whole forward, not once per layer. The BART
    encoder's self-attention and the decoder's cross-attention read the same mask tensor in
    the same 128-bucket, and a padding mask does not depend on the query, so they share it:
    one per-batch build (before: one per encoder and decoder layer)."""
    from torch.nn.attention.flex_attention import flex_attention

    from mmcap.config import PrecisionConfig, get_preset
    from mmcap.model.captioner import CaptioningModel

    monkeypatch.setattr(flex, "_compiled_flex_attention", lambda: flex_attention)
    monkeypatch.setenv("MMCAP_ATTN_BACKEND", "flex")
    flex._static_block_mask.cache_clear()
    cfg = get_preset("debug-gemma")
    assert cfg.decoder.num_layers >= 2 and cfg.encoder.num_layers >= 2
    model = CaptioningModel(cfg, precision=PrecisionConfig("fp32")).eval()
    v = cfg.vision.image_size
    prompt = torch.randint(3, 50, (2, 6))
    prompt_mask = _padding([6, 4], 6)
    ids = torch.randint(3, 50, (2, 5))
    with torch.no_grad():
        model(prompt, ids, prompt_mask=prompt_mask, pixel_values=torch.randn(2, 3, v, v))
    static = flex._static_block_mask.cache_info().currsize  # decoder self-attention kinds
    assert static >= 1 and len(builds) == 1 + static, (len(builds), static)
