"""Activation recompute ("selective": core attention, "full": every layer) leaves the training
step unchanged: with dropout on everywhere, the same seeds give bit-identical losses and
parameter gradients (megatron-core's ``tensor_parallel.checkpoint`` replays the RNG states),
and the recompute really runs (counted calls of the attention back-end and of the MLPs)."""

import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel

import mmcap.model.attention as attention_module
from mmcap.config import ConfigError, PrecisionConfig, TrainableConfig, get_preset, replace
from mmcap.model.build import build_model
from mmcap.model.decoder_base import IGNORE_INDEX
from mmcap.model.transformer_config import build_decoder_transformer_config

FP32 = PrecisionConfig("fp32")
DROP = 0.2  # any p > 0: every dropout site draws a mask
SEED = 7


def _config(preset: str, trainable: TrainableConfig | None):
    cfg = get_preset(preset)
    enc = dataclasses.replace(
        cfg.encoder, dropout=DROP, attention_dropout=DROP, activation_dropout=DROP
    )
    dec = dataclasses.replace(
        cfg.decoder, dropout=DROP, attention_dropout=DROP, activation_dropout=DROP
    )
    return replace(cfg, encoder=enc, decoder=dec, trainable=trainable or cfg.trainable)


def _models(cfg, modes):
    """One model per recompute mode, all with the weights of the first (gates non-zero so the
    Gemma cross-attention contributes)."""
    torch.manual_seed(0)
    models = {mode: build_model(cfg, precision=FP32, recompute=mode) for mode in modes}
    ref = models[modes[0]]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".gate"):
                p.fill_(0.7)
    for model in models.values():
        model.load_state_dict(ref.state_dict())
        model.train()  # the frozen vision tower stays in eval
    return models


def _batch(cfg):
    g = torch.Generator().manual_seed(3)
    size = cfg.vision.image_size
    prompt_mask = torch.ones(2, 5, dtype=torch.bool)
    prompt_mask[1, 3:] = False
    labels = torch.randint(3, 900, (2, 6), generator=g)
    labels[1, 0] = IGNORE_INDEX
    return {
        "prompt_ids": torch.randint(3, 900, (2, 5), generator=g),
        "decoder_input_ids": torch.randint(3, 900, (2, 6), generator=g),
        "prompt_mask": prompt_mask,
        "pixel_values": torch.randn(2, 3, size, size, generator=g),
        "labels": labels,
    }


def _step(model, batch):
    """One training forward + backward from fixed torch and RNG-tracker seeds."""
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)  # on CPU also reseeds torch
    torch.manual_seed(SEED)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).sum()
    loss.backward()
    after = torch.rand(4)  # RNG stream after the step (recompute must restore it)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, after


CASES = [
    ("debug-gemma", TrainableConfig(decoder="all")),
    ("debug-gemma", None),  # default policy: frozen decoder layers, trainable cross-attention
    ("debug-florence", None),
]


@pytest.mark.parametrize(("preset", "trainable"), CASES)
def test_recompute_is_bit_identical(single_rank_parallel_state, preset, trainable):
    cfg = _config(preset, trainable)
    modes = (None, "selective", "full")
    models, batch = _models(cfg, modes), _batch(cfg)
    ref_loss, ref_grads, ref_after = _step(models[None], batch)
    # Dropout is really on: another seed gives another loss.
    tensor_parallel.model_parallel_cuda_manual_seed(SEED + 1)
    torch.manual_seed(SEED + 1)
    assert not torch.equal(models[None](**batch).sum().detach(), ref_loss)
    assert all(g is not None for g in ref_grads.values())
    for mode in modes[1:]:
        loss, grads, after = _step(models[mode], batch)
        assert torch.equal(loss, ref_loss), mode
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert g is not None and torch.equal(g, ref_grads[name]), (mode, name)
        assert torch.equal(after, ref_after), mode


def test_full_recompute_after_a_frozen_input(single_rank_parallel_state):
    """A reentrant checkpoint only back-propagates when an input needs grad: trainable layers
    after a frozen embedding (no input grad) must still get their gradients."""
    cfg = _config("debug-florence", None)
    models, batch = _models(cfg, (None, "full")), _batch(cfg)
    for model in models.values():
        model.encoder.embedding.requires_grad_(False)
    _, ref_grads, _ = _step(models[None], batch)
    _, grads, _ = _step(models["full"], batch)
    assert any(n.startswith("encoder.layers.0.") for n in ref_grads)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None and torch.equal(g, ref_grads[name]), name


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_recompute_runs(single_rank_parallel_state, monkeypatch, preset):
    """Per training step: "full" runs every layer body (so its MLP) and every core attention
    twice, "selective" only the core attention; eval / no_grad never recomputes."""
    cfg = _config(preset, TrainableConfig(decoder="all"))
    modes = (None, "selective", "full")
    models, batch = _models(cfg, modes), _batch(cfg)
    counts = {"attn": 0, "mlp": 0}
    backend = attention_module.attention

    def counting_attention(*args, **kwargs):
        counts["attn"] += 1
        return backend(*args, **kwargs)

    monkeypatch.setattr(attention_module, "attention", counting_attention)
    for model in models.values():
        for name, m in model.named_modules():
            if name.endswith(".mlp") and ".layers." in name:
                m.register_forward_hook(lambda *_: counts.__setitem__("mlp", counts["mlp"] + 1))

    def count(model, train=True):
        counts.update(attn=0, mlp=0)
        if train:
            _step(model, batch)
        else:
            with torch.no_grad():
                model(**batch)
        return counts["attn"], counts["mlp"]

    attn, mlp = count(models[None])
    layers = cfg.encoder.num_layers + cfg.decoder.num_layers
    assert (attn, mlp) == (cfg.encoder.num_layers + 2 * cfg.decoder.num_layers, layers)
    assert count(models["selective"]) == (2 * attn, mlp)
    assert count(models["full"]) == (2 * attn, 2 * mlp)
    for mode in ("selective", "full"):
        assert count(models[mode].eval(), train=False) == (attn, mlp)
        assert count(models[mode].train(), train=False) == (attn, mlp)  # no_grad


def test_recompute_config(single_rank_parallel_state):
    dec = get_preset("debug-gemma").decoder
    full = build_decoder_transformer_config(dec, recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    sel = build_decoder_transformer_config(dec, recompute="selective")
    assert sel.recompute_granularity == "selective" and sel.recompute_modules == ["core_attn"]
    assert build_decoder_transformer_config(dec).recompute_granularity is None
    with pytest.raises(ConfigError, match="recompute"):
        build_model(get_preset("debug-gemma"), precision=FP32, recompute="block")
