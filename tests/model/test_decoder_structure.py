"""Pipeline-ready structure of the Gemma-2 decoder: stage flags, layer ranges, meta build and
the 11.2B model's decoder parameter count."""

import dataclasses

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.hf.gemma2_keys import stage_state_dict
from mmcap.model.build import build_gemma2_decoder
from mmcap.model.pipeline import decoder_layer_range
from mmcap.model.size import count_parameters
from mmcap.parallel.tp import full_state_dict, load_full_state_dict

FP32 = PrecisionConfig("fp32")

# SYSTEM.md: Gemma-2-9B 9,241,705,984 + 42 cross-attention blocks 1,409,436,714.
GEMMA2_9B = 9_241_705_984
XATTN_9B = 1_409_436_714


def test_layer_ranges_megatron_layout():
    assert decoder_layer_range(42, 0, 2) == (0, 21)
    assert decoder_layer_range(42, 1, 2) == (21, 42)
    # Interleaved: 8 layers, PP=2, VPP=2 -> chunks of 2: stage0 {0,1},{4,5}; stage1 {2,3},{6,7}.
    assert decoder_layer_range(8, 0, 2, 1, 2) == (4, 6)
    assert decoder_layer_range(8, 1, 2, 0, 2) == (2, 4)
    with pytest.raises(ValueError, match="not divisible"):
        decoder_layer_range(42, 0, 4)


def test_xlarge_decoder_count_on_meta(single_rank_parallel_state):
    size = count_parameters(
        get_preset("florence-gemma-2-xlarge"),
        ParallelConfig(tensor_parallel=8, pipeline_parallel=2),
    )
    decoder = sum(n for c, n in size.by_component.items() if c.startswith("decoder."))
    print(f"florence-gemma-2-xlarge decoder: {decoder} ({size.by_component})")
    expected = GEMMA2_9B + XATTN_9B
    assert abs(decoder - expected) / expected <= 0.01
    assert size.by_component["decoder.cross_attention"] == XATTN_9B
    assert decoder == expected  # vocab 256,000 needs no TP padding up to TP=8


def test_meta_build_allocates_nothing(single_rank_parallel_state):
    m = build_gemma2_decoder(get_preset("florence-gemma-2-large").decoder, meta=True)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == 2_614_341_888 + 299_952_666


def test_two_stage_split_equals_whole_model(single_rank_parallel_state):
    """Stages built with pre/post flags and layer ranges, chained by set_input_tensor,
    give the whole model's logits (the p2p of real pipelining is tested with the trainer)."""
    dec = dataclasses.replace(get_preset("debug-gemma").decoder, vocab_size=1000)
    torch.manual_seed(0)
    whole = build_gemma2_decoder(dec, precision=FP32).eval()
    full = full_state_dict(whole)
    with torch.no_grad():
        for n, t in full.items():
            if n.endswith("gate"):
                t.fill_(0.5)
    load_full_state_dict(whole, full)
    from mmcap.model.gemma2 import Gemma2Decoder
    from mmcap.model.transformer_config import build_decoder_transformer_config

    cfg = build_decoder_transformer_config(dec, precision=FP32)
    first = Gemma2Decoder(cfg, dec, pre_process=True, post_process=False, layer_range=(0, 2)).eval()
    last = Gemma2Decoder(cfg, dec, pre_process=False, post_process=True, layer_range=(2, 4)).eval()
    assert not hasattr(first, "output_layer") and not hasattr(last, "embedding")
    assert [layer.layer_idx for layer in last.layers] == [2, 3]
    load_full_state_dict(first, stage_state_dict(full, (0, 2), True, False))
    load_full_state_dict(last, stage_state_dict(full, (2, 4), False, True))

    ids = torch.randint(0, 1000, (2, 10))
    enc = torch.randn(5, 2, dec.encoder_hidden_size)
    with torch.no_grad():
        ref = whole(ids, enc)
        hidden = first(ids, enc)
        last.set_input_tensor([hidden])
        out = last(ids, enc)
    assert torch.equal(out, ref)


def test_missing_encoder_output_is_a_clear_error(single_rank_parallel_state):
    m = build_gemma2_decoder(get_preset("debug-gemma").decoder, precision=FP32)
    with pytest.raises(ValueError, match="needs encoder_out"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_bf16_forward_backward(single_rank_parallel_state):
    """The default precision: bf16 weights/activations, fp32 norm statistics and loss."""
    m = build_gemma2_decoder(get_preset("debug-gemma").decoder, precision=PrecisionConfig("bf16"))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ids = torch.randint(0, 1000, (2, 10))
    enc = torch.randn(5, 2, 64, dtype=torch.bfloat16)
    logits = m(ids, enc)
    assert logits.dtype == torch.bfloat16
    loss = m(ids, enc, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
