"""Parity of mmcap's frozen vision tower with transformers 5.x' Florence-2 vision side.

A tiny random ``Florence2ForConditionalGeneration`` (eager attention, float32) is built
locally; its vision + projector weights are converted with ``vision_from_hf(..., "hf")``.
Every vision tensor is re-drawn (LayerNorm weights around 1 and biases around 0 included, so a
missing affine or bias fails). Sizes: 64 px (stage grids 16/8/4/2, none a multiple of the
window 3: every stage pads), 96 px (24/12/6/3: no padding), 160 px and a non-square 64x160.

Tolerance 1e-4 (fp32 max abs diff) is the issue's acceptance bound; observed <= 2.3e-5 on
features of magnitude 10-30 and <= 5e-6 on the image tokens.
"""

import pytest
import torch

from mmcap.config import VisionConfig, get_preset
from mmcap.model.vision import VisionTower, vision_from_hf, vision_to_hf
from mmcap.model.vision.hf_keys import TEMPORAL_KEY

TOL = 1e-4  # issue's fp32 acceptance bound
TINY = {
    "embed_dim": (16, 32, 64, 128),
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 4, 8),
    "num_groups": (1, 2, 4, 8),
    "window_size": 3,
    "projection_dim": 64,
}
SIZES = [(64, 64), (96, 96), (160, 160), (64, 160)]


def _vision_keys(sd, layout="hf"):
    ns = ("model.vision_tower.", "model.multi_modal_projector.")
    if layout == "official":
        ns = ("vision_tower.", "image_", "visual_temporal_embed.")
    return {k: v for k, v in sd.items() if k.startswith(ns)}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2VisionConfig,
    )

    text = BartConfig(
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    cfg = Florence2Config(
        vision_config=Florence2VisionConfig(**TINY), text_config=text, image_token_id=999
    )
    cfg._attn_implementation = "eager"  # the reference math; sdpa differs only in rounding
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
                continue
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))  # LayerNorm gain
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # biases
            else:  # fan-in scaled weights keep activations O(1) through 5 stages
                fan_in = p[0].numel() if p.ndim > 1 and "embeddings" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


@pytest.fixture(scope="module")
def tower(hf_model):
    t = VisionTower(VisionConfig(**TINY, image_size=64))
    t.load_state_dict(vision_from_hf(hf_model.state_dict(), "hf"), strict=True)
    return t.freeze()


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_features_and_tokens_match_hf(hf_model, tower, hw):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] + hw[1]))
    with torch.no_grad():
        ref_features = hf_model.model.vision_tower(x).last_hidden_state
        ref_tokens = hf_model.model.get_image_features(x).pooler_output
    features = tower.backbone(x)
    tokens = tower(x)
    grid = (hw[0] // 32, hw[1] // 32)
    assert features.shape == ref_features.shape == (2, 128, *grid)
    assert tokens.shape == ref_tokens.shape == (2, 1 + grid[0] * grid[1], 64)
    d_feat = (features - ref_features).abs().max().item()
    d_tok = (tokens - ref_tokens).abs().max().item()
    print(
        f"{hw}: features max|diff| {d_feat:.2e} (max|x| {ref_features.abs().max():.1f}), "
        f"tokens {d_tok:.2e}"
    )
    assert d_feat <= TOL and d_tok <= TOL


def test_window_attention_chunking_is_exact(tower, monkeypatch):
    """The window chunks used above the CUDA grid limit give the single-call result."""
    from mmcap.model.vision import davit

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    whole = tower(x)
    monkeypatch.setattr(davit, "MAX_SDPA_BATCH", 5)  # 64 px: 72 windows in the first stage
    torch.testing.assert_close(tower(x), whole, rtol=0, atol=1e-6)  # fp32 rounding only


def test_num_image_tokens_matches_config(tower):
    cfg = VisionConfig(**TINY, image_size=96)
    assert tower(torch.zeros(1, 3, 96, 96)).shape[1] == cfg.num_image_tokens == 10


def _assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def test_round_trip_hf_layout(hf_model, tower):
    hf = _vision_keys(hf_model.state_dict())
    _assert_bit_equal(vision_to_hf(vision_from_hf(hf, "hf"), "hf"), hf)
    ours = tower.state_dict()
    _assert_bit_equal(vision_from_hf(vision_to_hf(ours, "hf"), "hf"), ours)


def test_round_trip_official_layout(hf_model, tower):
    ours = tower.state_dict()
    official = vision_to_hf(ours, "official")
    hf = hf_model.state_dict()
    # Names and the transposed bare image_projection of the remote-code layout.
    assert torch.equal(
        official["image_projection"], hf["model.multi_modal_projector.image_projection.weight"].t()
    )
    assert torch.equal(
        official["vision_tower.blocks.2.1.spatial_block.window_attn.fn.qkv.weight"],
        hf["model.vision_tower.blocks.2.1.spatial_block.window_attn.qkv.weight"],
    )
    assert torch.equal(
        official["vision_tower.blocks.0.0.channel_block.channel_attn.norm.bias"],
        hf["model.vision_tower.blocks.0.0.channel_block.norm1.bias"],
    )
    assert torch.equal(
        official["vision_tower.convs.3.proj.weight"], hf["model.vision_tower.convs.3.conv.weight"]
    )
    assert torch.equal(
        official["vision_tower.blocks.3.0.channel_block.ffn.fn.net.fc2.bias"],
        hf["model.vision_tower.blocks.3.0.channel_block.ffn.fc2.bias"],
    )
    _assert_bit_equal(vision_from_hf(official, "official"), ours)
    _assert_bit_equal(vision_to_hf(vision_from_hf(official, "official"), "official"), official)
    # hf -> official -> hf, through mmcap, is the identity.
    hf_vision = _vision_keys(hf)
    via = vision_from_hf(vision_to_hf(vision_from_hf(hf_vision, "hf"), "official"), "official")
    _assert_bit_equal(vision_to_hf(via, "hf"), hf_vision)
    # The original DaViT's unused classifier leftovers are accepted and dropped.
    extra = {"vision_tower.norms.weight": torch.ones(128), "vision_tower.head.bias": torch.ones(9)}
    _assert_bit_equal(vision_from_hf({**official, **extra}, "official"), ours)


def test_key_errors_name_the_tensor(hf_model):
    hf = hf_model.state_dict()
    gone = "model.vision_tower.blocks.2.1.channel_block.ffn.fc1.bias"
    with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
        vision_from_hf({k: v for k, v in hf.items() if k != gone}, "hf")
    odd = "model.vision_tower.blocks.0.0.spatial_block.window_attn.rel_pos"
    with pytest.raises(KeyError, match=odd.replace(".", r"\.")):
        vision_from_hf({**hf, odd: torch.zeros(1)}, "hf")
    bad = dict(hf)
    bad[TEMPORAL_KEY["hf"]] = bad[TEMPORAL_KEY["hf"]] + 0.01
    with pytest.raises(ValueError, match="cosine formula"):
        vision_from_hf(bad, "hf")
    with pytest.raises(ValueError, match="layout"):
        vision_from_hf(hf, "remote")
    # The temporal table is optional on import (mmcap recomputes it).
    del bad[TEMPORAL_KEY["hf"]]
    assert "projector.proj.weight" in vision_from_hf(bad, "hf")


def test_frozen_tower_stays_in_eval_mode():
    cfg = VisionConfig(**{**TINY, "depths": (1, 1, 1, 1)}, image_size=64, drop_path_rate=0.5)
    torch.manual_seed(0)
    t = VisionTower(cfg).train()
    x = torch.randn(4, 3, 64, 64)
    # Not frozen: drop-path is live, so two passes differ (the check below can fail).
    assert not torch.equal(t(x), t(x))
    t.freeze().train()
    assert not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    a, b = t(x), t(x)
    assert torch.equal(a, b) and not a.requires_grad


def test_meta_build_resets_temporal_table():
    cfg = VisionConfig(**TINY)
    with torch.device("meta"):
        t = VisionTower(cfg)
    t.to_empty(device="cpu")
    t.projector.reset_buffers()
    from mmcap.model.vision import cosine_temporal_table

    assert torch.equal(t.projector.temporal_embed, cosine_temporal_table(100, 128))


@pytest.mark.parametrize(
    "preset, expected",
    # Florence-2-base / -large vision + projector. Cross-check: SYSTEM.md's model totals minus
    # the BART encoder (51,328-row embedding) and decoder (257,024 rows) leave exactly these.
    [("florence-2-base", 91_207_168), ("florence-2-large", 362_833_920)],
)
def test_parameter_count_on_meta(preset, expected):
    with torch.device("meta"):
        t = VisionTower(get_preset(preset).vision)
    n = sum(p.numel() for p in t.parameters())
    print(f"{preset} vision+projector parameters: {n:,}")
    assert n == expected
