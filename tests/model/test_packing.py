"""Sequence packing in the model: a packed batch gives the same per-sample losses and the same
gradients as the same samples padded (both families, a Gemma sliding window shorter than the
documents, mixed image / text-only samples), and no information crosses documents."""

import dataclasses

import numpy as np
import pytest
import torch

from mmcap.config import PrecisionConfig, get_preset
from mmcap.data.packing import plan_rows
from mmcap.model.build import build_model
from mmcap.testing.packing import (
    pack,
    padded_microbatches,
    per_sample_from_packed,
    random_samples,
    run_microbatch,
)

FP32 = PrecisionConfig("fp32")
N = 9


def _cfg(preset):
    cfg = get_preset(preset)
    if cfg.decoder.arch == "gemma2":  # window 4 < the documents' 2..14 decoder tokens
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, sliding_window=4))
    return cfg


@pytest.fixture(scope="module", params=["debug-gemma", "debug-florence"])
def model_and_cfg(request, single_rank_parallel_state):
    torch.manual_seed(0)
    cfg = _cfg(request.param)
    return build_model(cfg, precision=FP32).eval(), cfg


def _rows(cfg):
    n = cfg.vision.num_image_tokens
    return dict(enc_row=2 * n + 30, dec_row=28)  # several documents per row


def _padded_per_sample(model, samples, cfg):
    (mb,) = padded_microbatches(samples, cfg, N)
    return run_microbatch(model, mb).sum(1)


def _packed_per_sample(model, samples, cfg, rows_per_mb=2):
    rows, mbs = pack(samples, cfg, rows_per_mb=rows_per_mb, **_rows(cfg))
    losses = torch.cat([run_microbatch(model, mb) for mb in mbs])
    return per_sample_from_packed(rows, losses, N), rows


def test_packed_equals_padded_losses_and_gradients(model_and_cfg):
    model, cfg = model_and_cfg
    samples = random_samples(cfg, N, seed=1)
    want = _padded_per_sample(model, samples, cfg)
    got, rows = _packed_per_sample(model, samples, cfg)
    assert max(len(r) for r in rows.rows) >= 3, "the rows should hold several documents"
    assert rows.num_rows < N
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    def grads(fn):
        model.zero_grad()
        fn().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_pad = grads(lambda: _padded_per_sample(model, samples, cfg))
    g_pack = grads(lambda: _packed_per_sample(model, samples, cfg)[0])
    assert g_pad.keys() == g_pack.keys() and g_pad
    for name in g_pad:
        scale = g_pad[name].abs().max().clamp(min=1e-6)
        err = (g_pack[name] - g_pad[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_no_information_crosses_documents(model_and_cfg):
    """Changing one document (its image, prompt and target) leaves every other document's
    logits bit-identical."""
    model, cfg = model_and_cfg
    samples = random_samples(cfg, N, seed=2)
    rows, mbs = pack(samples, cfg, rows_per_mb=3, **_rows(cfg))
    r = next(i for i, m in enumerate(rows.rows) if len(m) >= 3)
    victim = rows.rows[r][1]  # a document in the middle of a row
    changed = random_samples(cfg, N, seed=2)
    changed.tokens.encoder_input_ids[victim, 1] += 1
    changed.tokens.decoder_input_ids[victim, 1] += 1
    changed.pixels[victim] += 1.0
    rows2, mbs2 = pack(changed, cfg, rows_per_mb=3, **_rows(cfg))
    assert rows2.rows == rows.rows
    with torch.no_grad():
        a = torch.cat([run_microbatch(model, m, labels=False) for m in mbs])
        b = torch.cat([run_microbatch(model, m, labels=False) for m in mbs2])
    doc = torch.from_numpy(rows.decoder_doc)
    victim_tokens = torch.zeros_like(doc, dtype=torch.bool)
    victim_tokens[r] = doc[r] == rows.rows[r].index(victim)
    others = (doc >= 0) & ~victim_tokens
    assert torch.equal(a[others], b[others])
    assert not torch.equal(a[victim_tokens], b[victim_tokens])


def test_plan_rows():
    rows = plan_rows(np.array([5, 5, 2, 9, 1]), np.array([3, 8, 2, 1, 6]), 10, 10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    for r in rows:
        assert sum([5, 5, 2, 9, 1][i] for i in r) <= 10
        assert sum([3, 8, 2, 1, 6][i] for i in r) <= 10
        assert r == sorted(r)
    assert rows == sorted(rows, key=lambda r: r[0])
    assert plan_rows(np.array([5, 5, 2, 9, 1]), np.array([3, 8, 2, 1, 6]), 10, 10) == rows
    # Balanced filling: an encoder-heavy and a decoder-heavy sample share a row.
    assert plan_rows(np.array([8, 8, 2, 2]), np.array([2, 2, 8, 8]), 10, 10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="sample 1 .* does not fit"):
        plan_rows(np.array([1, 11]), np.array([1, 1]), 10, 10)


def test_packed_feature_cache_equals_pixels(model_and_cfg):
    """Cached vision features (image_tokens per image) give the packed losses of the pixels."""
    from mmcap.model.stage_io import split_packed_microbatches

    model, cfg = model_and_cfg
    samples = random_samples(cfg, N, seed=4)
    rows, mbs = pack(samples, cfg, rows_per_mb=2, **_rows(cfg))
    with torch.no_grad():
        features = model.vision(samples.pixels)  # [N, n, d]: the cache holds one per sample
        want = torch.cat([run_microbatch(model, mb) for mb in mbs])
        cached = split_packed_microbatches(
            rows, 2, num_image_tokens=cfg.vision.num_image_tokens, features=features
        )
        assert all(mb.pixel_values is None for mb in cached)
        got = torch.cat([run_microbatch(model, mb) for mb in cached])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_partial_last_microbatch():
    from mmcap.model.stage_io import split_packed_microbatches

    cfg = _cfg("debug-florence")
    rows, _ = pack(random_samples(cfg, N, seed=0), cfg, rows_per_mb=1, **_rows(cfg))
    assert rows.num_rows % 2 == 1, "the case needs an odd row count"
    with pytest.raises(ValueError, match="do not split"):
        split_packed_microbatches(rows, 2, num_image_tokens=cfg.vision.num_image_tokens)
    mbs = split_packed_microbatches(
        rows, 2, num_image_tokens=cfg.vision.num_image_tokens, allow_partial=True
    )
    assert [mb.decoder_input_ids.shape[0] for mb in mbs][-1] == 1
    assert sum(mb.decoder_input_ids.shape[0] for mb in mbs) == rows.num_rows
