"""Model FLOPs (mmcap.train.flops) against torch's FlopCounterMode on the real modules.

The ``math`` attention back-end computes the full score matrix before masking, so measured
attention is the dense count: the analytic counts are compared with ``dense_attention=True``,
linear layers (aten.mm / addmm) and attention (aten.bmm) separately and exactly; the attended
(masked) key counts are compared with the model's own mask predicate.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmcap.config import PrecisionConfig, TrainableConfig, get_preset, replace
from mmcap.model.build import build_model
from mmcap.ops.attention.math_ref import AttnMaskSpec
from mmcap.train.flops import (
    attended_keys,
    batch_step_flops,
    forward_flop_terms,
    forward_flops,
    mfu,
    peak_tflops,
    peak_tflops_for_name,
    step_flops,
    vision_forward_flops,
)

FP32 = PrecisionConfig("fp32")
P, T = 7, 13  # prompt / target tokens; T > the debug-gemma sliding window (8)


@pytest.fixture(autouse=True)
def _math_attention(monkeypatch):
    monkeypatch.setenv("MMCAP_ATTN_BACKEND", "math")


def _split(counter: FlopCounterMode) -> tuple[int, int]:
    """(linear, attention) FLOPs measured: mm/addmm are linears, bmm the attention matmuls."""
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert set(ops) <= {"aten.mm", "aten.addmm", "aten.bmm"}, ops
    return ops.get("aten.mm", 0) + ops.get("aten.addmm", 0), ops.get("aten.bmm", 0)


def _measure_forward(model, cfg, prompt_len, target_len, with_image, device="cpu", dtype=None):
    """Measured (encoder linear, encoder attention, decoder linear, decoder attention)."""
    dtype = dtype or torch.float32
    with torch.device(device):
        prompt = torch.randint(3, 900, (1, prompt_len))
        dec = torch.randint(3, 900, (1, target_len))
        n_img = cfg.vision.num_image_tokens
        img = torch.randn(1, n_img, cfg.encoder.hidden_size, dtype=dtype) if with_image else None
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc_counter:
            enc, mask = model.encoder(prompt, None, img)
        with FlopCounterMode(display=False) as dec_counter:
            # The logits path: the LM head as one matmul over the padded vocabulary. The loss
            # path (mmcap.ops.softcap_ce) tiles it, skips padding rows and recomputes tiles in
            # backward: hardware FLOPs, not the model FLOPs the formula counts.
            model.decoder(dec, enc, mask, labels=None)
    return (*_split(enc_counter), *_split(dec_counter))


def _analytic(cfg, prompt_len, target_len, with_image):
    t = forward_flop_terms(cfg, prompt_len, target_len, with_image, dense_attention=True)
    dec_attn = t["decoder.self_attention.core"] + t["decoder.cross_attention.core"]
    dec_lin = sum(v for k, v in t.items() if k.startswith("decoder.")) - dec_attn
    return (t["encoder.linear"], t["encoder.attention"], dec_lin, dec_attn)


@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_forward_matches_flop_counter(single_rank_parallel_state, preset, with_image):
    cfg = get_preset(preset)
    model = build_model(cfg, precision=FP32).eval()
    measured = _measure_forward(model, cfg, P, T, with_image)
    assert measured == _analytic(cfg, P, T, with_image)
    f = forward_flops(cfg, P, T, with_image, dense_attention=True)
    assert f["encoder"] == measured[0] + measured[1]
    assert f["decoder"] == measured[2] + measured[3]


@pytest.mark.parametrize(
    "preset", ["florence-gemma-2-large", "florence-gemma-2-xlarge", "florence-2-base"]
)
def test_paper_models_on_meta(single_rank_parallel_state, preset):
    """The full-size decoders (GQA 8/4 and 16/8, head_dim 256 != width / heads, 257,024 /
    256,000-row LM heads, 1024-wide encoder) measured on the meta device (no memory)."""
    cfg = get_preset(preset)
    model = build_model(cfg, precision=PrecisionConfig("bf16"), meta=True).eval()
    measured = _measure_forward(model, cfg, 12, 40, True, device="meta", dtype=torch.bfloat16)
    assert measured == _analytic(cfg, 12, 40, True)


def test_attended_keys_brute_force():
    for t in range(1, 30):
        for window in (None, 1, 2, 3, 8, t - 1, t, t + 5):
            if window is not None and window < 1:
                continue
            brute = sum(min(i + 1, window or t + 1) for i in range(t))
            mask = AttnMaskSpec(causal=True, window=window).dense(t, t, torch.device("cpu"))
            assert attended_keys(t, window) == brute == int(mask.sum()), (t, window)
    assert attended_keys(0) == attended_keys(0, 4) == 0


def test_self_attention_counts_attended_keys(single_rank_parallel_state):
    """Non-dense decoder self-attention = 4 * heads * head_dim * (allowed (q, k) pairs of the
    mask each BUILT layer applies), so sliding / global alternation and the window are those of
    the model; the window must bind (T > W) on the sliding layers."""
    cfg = get_preset("debug-gemma")
    model = build_model(cfg, precision=FP32)
    dec = cfg.decoder
    pairs = 0
    windows = []
    for layer in model.decoder.layers:
        window = layer.self_attention.spec.window
        windows.append(window)
        pairs += int(AttnMaskSpec(causal=True, window=window).dense(T, T, "cpu").sum())
    assert None in windows and dec.sliding_window in windows and T > dec.sliding_window
    exact = forward_flop_terms(cfg, P, T)["decoder.self_attention.core"]
    assert exact == 4 * dec.num_attention_heads * dec.head_dim * pairs
    dense = forward_flop_terms(cfg, P, T, dense_attention=True)["decoder.self_attention.core"]
    assert dense == 4 * dec.num_attention_heads * dec.head_dim * T * T * dec.num_layers
    assert exact < dense


def _measure_step(model, cfg):
    """Forward + backward FLOPs of one sample with precomputed image tokens (tower not run)."""
    prompt = torch.randint(3, 900, (1, P))
    dec = torch.randint(3, 900, (1, T))
    img = torch.randn(1, cfg.vision.num_image_tokens, cfg.encoder.hidden_size)
    with FlopCounterMode(display=False) as counter:
        # logits (not the fused loss, see _measure_forward); padded rows carry no gradient
        model(prompt, dec, image_tokens=img).float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_step_matches_autograd(single_rank_parallel_state, preset):
    """The paper's freezing policies: autograd computes exactly the dgrads and wgrads of the
    formula (it skips wgrad of frozen weights; every dgrad is needed)."""
    cfg = get_preset(preset)
    model = build_model(cfg, precision=FP32).train()
    step = step_flops(cfg, P, T, count_vision=False, dense_attention=True)
    assert _measure_step(model, cfg) == step
    fwd = forward_flops(cfg, P, T, dense_attention=True)
    if preset == "debug-gemma":  # frozen self-attention / MLP weights: no wgrad
        frozen = forward_flop_terms(cfg, P, T, dense_attention=True)
        missing = frozen["decoder.self_attention.linear"] + frozen["decoder.mlp"]
        assert step == 3 * (fwd["encoder"] + fwd["decoder"]) - missing
        assert step < 3 * (fwd["encoder"] + fwd["decoder"])
    else:
        assert step == 3 * (fwd["encoder"] + fwd["decoder"])
    with_vision = step_flops(cfg, P, T, dense_attention=True)
    assert with_vision == step + fwd["vision"]  # frozen tower: forward only


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_step_frozen_encoder(single_rank_parallel_state, preset):
    """Frozen encoder: forward only, and no dgrad of the cross-attention KV projections in the
    model FLOPs; megatron-core's linear computes that dgrad anyway (documented difference)."""
    cfg = replace(get_preset(preset), trainable=TrainableConfig(encoder=False))
    model = build_model(cfg, precision=FP32).train()
    step = step_flops(cfg, P, T, count_vision=False, dense_attention=True)
    terms = forward_flop_terms(cfg, P, T, dense_attention=True)
    assert _measure_step(model, cfg) == step + terms["decoder.cross_attention.kv"]
    trained = step_flops(get_preset(preset), P, T, count_vision=False, dense_attention=True)
    enc = terms["encoder.linear"] + terms["encoder.attention"]
    assert trained - step == 2 * enc + terms["decoder.cross_attention.kv"]


def test_vision_measured_on_meta_equals_cpu_run():
    cfg = get_preset("debug-gemma")
    from mmcap.model.vision import VisionTower

    tower = VisionTower(cfg.vision).freeze()
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        tower(torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size))
    ops = {str(k) for k in counter.get_flop_counts()["Global"]}
    assert {"aten.convolution", "aten.bmm"} <= ops  # convs and window / channel attention
    assert vision_forward_flops(cfg.vision) == counter.get_total_flops() > 0
    big = replace(cfg.vision, image_size=2 * cfg.vision.image_size)
    assert vision_forward_flops(big) > 3 * vision_forward_flops(cfg.vision)


def test_text_only_and_batch():
    cfg = get_preset("debug-gemma")
    n_img = cfg.vision.num_image_tokens
    text = forward_flops(cfg, P + n_img, T, with_image=False)
    image = forward_flops(cfg, P, T, with_image=True)
    assert text["vision"] == 0 and image["vision"] == vision_forward_flops(cfg.vision)
    assert text["encoder"] == image["encoder"] and text["decoder"] == image["decoder"]
    total = batch_step_flops(cfg, [P, 3], [T, 20], [True, False])
    assert total == step_flops(cfg, P, T, True) + step_flops(cfg, 3, 20, False)
    assert batch_step_flops(cfg, [], [], []) == 0
    with pytest.raises(ValueError, match="differ in length"):
        batch_step_flops(cfg, [P], [T, T], [True])


def test_peak_and_mfu():
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3", "fp32") == 494.7
    assert peak_tflops_for_name("NVIDIA H100 SXM5 80GB", torch.bfloat16) == 989.4
    assert peak_tflops_for_name("NVIDIA H100 PCIe", "fp16") == 756.0
    assert peak_tflops_for_name("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert peak_tflops_for_name("NVIDIA A100-PCIE-40GB", "tf32") == 156.0
    assert peak_tflops_for_name("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="dtype"):
        peak_tflops_for_name("NVIDIA H100 80GB HBM3", "int8")
    assert peak_tflops("cpu") is None
    if not torch.cuda.is_available():
        assert peak_tflops() is None
    assert mfu(494.7e12, 989.4) == pytest.approx(0.5)
    assert mfu(1e12, None) is None
