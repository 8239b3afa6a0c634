"""Mixed batches (samples with and without an image, e.g. captions + JSONL translations):
every sample's loss and every gradient equal those of the two groups run on their own (text-only
samples see their prompt alone, as on their own); the mask rebuilt for later pipeline stages
(MicroBatch.encoder_mask) equals the first stage's."""

import pytest
import torch

from mmcap.config import PrecisionConfig, get_preset
from mmcap.model.build import build_model
from mmcap.model.stage_io import MicroBatch

FP32 = PrecisionConfig("fp32")


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_mixed_equals_separate(single_rank_parallel_state, preset):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = build_model(cfg, precision=FP32).eval()
    b, s_p, s = 5, 7, 6
    prompt = torch.randint(3, 900, (b, s_p))
    pmask = torch.ones(b, s_p, dtype=torch.bool)
    pmask[1, 5:] = False
    pmask[3, 4:] = False
    dec = torch.randint(3, 900, (b, s))
    labels = torch.randint(3, 900, (b, s))
    pixels = torch.randn(b, 3, 64, 64)
    has_image = torch.tensor([True, False, True, False, False])

    def loss_of(idx, with_image):
        return model(
            prompt[idx],
            dec[idx],
            pmask[idx],
            pixel_values=pixels[idx] if with_image else None,
            labels=labels[idx],
        )

    img, txt = has_image.nonzero().flatten(), (~has_image).nonzero().flatten()
    mixed = model(prompt, dec, pmask, pixel_values=pixels, labels=labels, has_image=has_image)
    torch.testing.assert_close(mixed[img], loss_of(img, True), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[txt], loss_of(txt, False), rtol=0, atol=1e-5)

    # gradients of the summed loss
    def grads(fn):
        model.zero_grad()
        fn().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_mixed = grads(
        lambda: model(prompt, dec, pmask, pixel_values=pixels, labels=labels, has_image=has_image)
    )
    g_sep = grads(lambda: torch.cat([loss_of(img, True), loss_of(txt, False)]))
    assert g_mixed.keys() == g_sep.keys() and g_mixed
    for n in g_mixed:
        torch.testing.assert_close(g_mixed[n], g_sep[n], rtol=1e-4, atol=1e-6, msg=n)

    # the mask later stages rebuild equals the encoder's
    _, mask = model.encode(prompt, pmask, pixels, has_image=has_image)
    mb = MicroBatch(
        prompt, pmask, dec, labels, pixels, None, cfg.vision.num_image_tokens, has_image
    )
    assert torch.equal(mb.encoder_mask, mask)
    assert not mask[1, : cfg.vision.num_image_tokens].any()
    assert mask[0, : cfg.vision.num_image_tokens].all()


def test_host_cut_image_rows_split_without_a_host_read(single_rank_parallel_state):
    """split_microbatches cuts a mixed micro-batch's image / text rows on the host
    (ImageRows); the encoder then reads nothing back from the device (it read has_image with
    ``bool(all())`` and two ``nonzero``: host syncs on CUDA) and its output is the same."""
    from mmcap.data.collate import TokenBatch
    from mmcap.model.stage_io import split_microbatches
    from mmcap.testing.syncs import HostSyncCounter

    torch.manual_seed(1)
    cfg = get_preset("debug-gemma")
    model = build_model(cfg, precision=FP32).eval()
    b, s_p, s = 6, 7, 5
    tokens = TokenBatch(
        encoder_input_ids=torch.randint(3, 900, (b, s_p)),
        encoder_attention_mask=torch.ones(b, s_p, dtype=torch.bool),
        decoder_input_ids=torch.randint(3, 900, (b, s)),
        decoder_attention_mask=torch.ones(b, s, dtype=torch.bool),
        labels=torch.randint(3, 900, (b, s)),
    )
    has_image = torch.tensor([True, False, True, True, True, True])
    mbs = split_microbatches(
        tokens,
        3,
        num_image_tokens=cfg.vision.num_image_tokens,
        has_image=has_image,
        pixels=torch.randn(b, 3, 64, 64),
    )
    assert mbs[0].image_rows.image.tolist() == [0, 2]
    assert mbs[0].image_rows.text.tolist() == [1]
    assert mbs[1].image_rows.image.tolist() == [0, 1, 2] and mbs[1].image_rows.text.numel() == 0
    for mb in mbs:
        args = (mb.prompt_ids, mb.prompt_mask, mb.pixel_values, None, mb.has_image)
        with torch.no_grad():
            with HostSyncCounter() as c:
                out, mask = model.encode(*args, image_rows=mb.image_rows)
            want, want_mask = model.encode(*args)
        assert c.syncs == [], c.table()
        assert torch.equal(out, want) and torch.equal(mask, want_mask)
    first = mbs[0]
    with torch.no_grad(), HostSyncCounter() as c:  # without the rows: read from the device
        model.encode(first.prompt_ids, first.prompt_mask, first.pixel_values, None, first.has_image)
    kinds = [s.kind for s in c.syncs]
    assert kinds.count("__bool__") == 1 and kinds.count("nonzero") == 2, c.table()
