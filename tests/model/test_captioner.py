"""The assembled captioning model: parameter counts of the four paper presets (built on the
meta device by tools/model_size.py), the freezing policy, and pipeline-stage chaining."""

import re

import pytest
import torch

from mmcap.config import ConfigError, PrecisionConfig, TrainableConfig, get_preset, replace
from mmcap.model.build import build_model
from mmcap.model.captioner import CaptioningModel
from mmcap.model.decoder_base import IGNORE_INDEX
from mmcap.parallel.tp import full_state_dict, load_full_state_dict

FP32 = PrecisionConfig("fp32")

# SYSTEM.md "The four models": the official classes built from the official configs (tied
# head counted once), with 4,098-row BART position tables on the large sizes and a 51,289-row
# encoder embedding on the Gemma sizes. tools/model_size.py must print them exactly.
PAPER_COUNTS = {
    "florence-2-base": 428_838_400,
    "florence-2-large": 1_039_697_920,
    "florence-gemma-2-large": 3_485_001_498,
    "florence-gemma-2-xlarge": 11_221_849_642,
}


@pytest.mark.parametrize("preset", list(PAPER_COUNTS))
def test_model_size_tool(single_rank_parallel_state, capsys, preset):
    from tools.model_size import main

    assert main(["--preset", preset]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"^total: (\d+)$", out, re.MULTILINE).group(1))
    trainable = int(re.search(r"^trainable: (\d+)$", out, re.MULTILINE).group(1))
    assert total == PAPER_COUNTS[preset]
    assert 0 < trainable < total


def test_position_tables_follow_the_official_configs():
    """Official data/pretrained/*/config.json: max_position_embeddings 4096 for the large
    sizes' BART encoder and Florence-2-large's decoder, 1024 for florence-2-base."""
    for name, enc, dec in [
        ("florence-2-base", 1024, 1024),
        ("florence-2-large", 4096, 4096),
        ("florence-gemma-2-large", 4096, 8192),
        ("florence-gemma-2-xlarge", 4096, 8192),
    ]:
        cfg = get_preset(name)
        assert cfg.encoder.max_position_embeddings == enc, name
        assert cfg.decoder.max_position_embeddings == dec, name


def test_freezing_policy_gemma(single_rank_parallel_state):
    model = build_model(get_preset("debug-gemma"), precision=FP32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision.") for n in trainable)
    assert any(n.startswith("encoder.layers.") for n in trainable)
    dec = {n for n in trainable if n.startswith("decoder.")}
    assert "decoder.embedding.word_embeddings.weight" in dec
    assert all(".cross_attention." in n or "embedding" in n for n in dec)
    assert "decoder.layers.0.cross_attention.gate" in dec
    assert "decoder.layers.0.cross_attention.post_norm.weight" in dec
    assert "decoder.layers.0.self_attention.linear_qkv.weight" not in dec
    # Frozen tower stays in eval mode (no drop-path) when the model trains.
    model.train()
    assert not model.vision.training and model.encoder.training
    ids = torch.randint(3, 900, (2, 5))
    loss = model(ids, ids, pixel_values=torch.randn(2, 3, 64, 64), labels=ids).mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_freezing_policy_florence_and_override(single_rank_parallel_state):
    model = build_model(get_preset("debug-florence"), precision=FP32)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.layers.") and "self_attention" in n for n in names)
    assert not any(n.startswith("vision.") for n in names)
    cfg = replace(
        get_preset("debug-gemma"), trainable=TrainableConfig(decoder="all", encoder=False)
    )
    model = build_model(cfg, precision=FP32)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder."))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("encoder."))


def test_vision_train_mode_switch(single_rank_parallel_state):
    """ModelConfig.vision_train_mode (official behaviour): the frozen tower follows the model
    into train mode, so drop-path changes its output, still without gradients; in eval mode
    the output equals the default (pinned-eval) tower's. The default is unaffected by train()."""
    torch.manual_seed(0)
    default = CaptioningModel(get_preset("debug-florence"), precision=FP32)
    official = CaptioningModel(
        replace(get_preset("debug-florence"), vision_train_mode=True), precision=FP32
    )
    load_full_state_dict(official, full_state_dict(default))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    default.eval(), official.eval()
    ref = default.vision(pixels)
    assert not official.vision.training and torch.equal(official.vision(pixels), ref)
    default.train(), official.train()
    assert not default.vision.training and official.vision.training
    assert torch.equal(default.vision(pixels), ref)
    a, b = official.vision(pixels), official.vision(pixels)
    assert not torch.allclose(a, ref) and not torch.allclose(a, b)  # drop-path 0.1 active
    assert not a.requires_grad
    assert not any(p.requires_grad for p in official.vision.parameters())
    ids = torch.randint(3, 900, (2, 5))
    official(ids, ids, pixel_values=pixels, labels=ids).mean().backward()
    assert all(p.grad is None for p in official.vision.parameters())
    official.eval()
    assert torch.equal(official.vision(pixels), ref)
    with pytest.raises(ConfigError, match="vision_train_mode"):
        replace(
            get_preset("debug-florence"),
            vision_train_mode=True,
            trainable=TrainableConfig(vision=True),
        )


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_stage_chaining_equals_whole_model(single_rank_parallel_state, preset):
    """First stage (vision + encoder + decoder layers 0..k) hands [hidden, encoder_out] to the
    last stage, which must give the whole model's loss and send the encoder-output gradient
    back (the p2p itself is megatron-core's schedule, exercised with the trainer)."""
    cfg = get_preset(preset)
    n = cfg.decoder.num_layers
    torch.manual_seed(0)
    whole = CaptioningModel(cfg, precision=FP32).eval()
    full = full_state_dict(whole)
    for k in full:
        if k.endswith(".gate"):
            full[k] = torch.full_like(full[k], 0.7)
    load_full_state_dict(whole, full)
    first = CaptioningModel(cfg, precision=FP32, post_process=False, layer_range=(0, n // 2)).eval()
    last = CaptioningModel(
        cfg, precision=FP32, add_encoder=False, pre_process=False, layer_range=(n // 2, n)
    ).eval()
    renum = {f"decoder.layers.{i}.": f"decoder.layers.{i - n // 2}." for i in range(n // 2, n)}
    load_full_state_dict(
        first, {k: v for k, v in full.items() if k in dict(first.named_parameters())}
    )
    last_sd = {k: v for k, v in full.items() if k.startswith("decoder.final_layernorm")}
    for k, v in full.items():
        for old, new in renum.items():
            if k.startswith(old):
                last_sd[new + k[len(old) :]] = v
    last_sd["decoder.output_layer.weight"] = full["decoder.embedding.word_embeddings.weight"]
    load_full_state_dict(last, last_sd)

    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    prompt = torch.randint(3, 900, (2, 5), generator=g)
    dec = torch.randint(3, 900, (2, 6), generator=g)
    labels = torch.randint(3, 900, (2, 6), generator=g)
    labels[1, 0] = IGNORE_INDEX
    ref = whole(prompt, dec, pixel_values=pixels, labels=labels)

    packed = first(prompt, dec, pixel_values=pixels)
    _, enc_mask = first.encode(prompt, None, pixels)
    enc = first.encode(prompt, None, pixels)[0]
    assert packed.shape[0] > dec.shape[1]  # decoder rows + packed encoder rows
    packed_in = packed.detach().requires_grad_(True)
    last.set_input_tensor([packed_in])
    out = last(None, dec, labels=labels, encoder_mask=enc_mask)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    out.sum().backward()
    from mmcap.model.stage_io import packed_rows, unpack_stage_input

    k = packed_rows(enc.shape[0], enc.shape[2], cfg.decoder.hidden_size)
    enc_grad = packed_in.grad[-k:]
    assert enc_grad.abs().sum() > 0  # the later stage's cross-attention sends gradient back
    h, e = unpack_stage_input(packed.detach(), enc.shape[0], enc.shape[2])
    assert torch.equal(e, enc.detach()) and h.shape[0] == dec.shape[1]
    with pytest.raises(ValueError, match="set_input_tensor"):
        last(None, dec)
