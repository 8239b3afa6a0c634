"""mmcap.data.pil_resize (the GPU back-ends' resample) against PIL itself, on the CPU.

Measured 2026-11-30 (torch 2.13 CPU, Pillow 13.0.0): at most 2 grey levels from PIL on noise
images of random shapes (0.03% of values differ) and on the 36 demo photographs (mean 0.004
levels at 224 px); one 2-D float resize differs by up to 25 levels on noise, 13 on the photos.
"""

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmcap.data import pil_resize
from mmcap.data.pil_resize import pil_vertical_first, resize_like_pil

DEMO = sorted(glob.glob(str(Path(__file__).parents[2] / "examples/demo/images/*.jpg")))
# Shapes (w, h, out): down / up / mixed, tiny, extreme aspect ratios, both pass orders.
SHAPES = [(195, 303, 96), (366, 494, 96), (18, 283, 96), (600, 20, 224), (5, 7, 64),
          (37, 333, 224), (900, 17, 64), (300, 200, 768), (224, 224, 224),
          (640, 480, 7)]  # fmt: skip
MAX_LEVELS = 2  # float32 taps against PIL's 22-bit fixed-point ones


def _noise(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil(src, s):
    return np.asarray(Image.fromarray(src).resize((s, s), Image.BICUBIC)).astype(np.int64)


def _ours(src, s, device="cpu", fn=resize_like_pil):
    x = torch.from_numpy(src.copy()).permute(2, 0, 1)[None].to(device)
    return fn(x, (s, s))[0].permute(1, 2, 0).cpu().numpy().astype(np.int64)


def _one_pass_float(x, size):
    x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255)


def test_matches_pil_on_noise():
    assert {pil_vertical_first(w, h, s, s) for w, h, s in SHAPES} == (
        {True, False} if pil_resize.PILLOW_PICKS_ORDER else {False}
    )
    for i, (w, h, s) in enumerate(SHAPES):
        src = _noise(w, h, i)
        d = np.abs(_ours(src, s) - _pil(src, s))
        assert d.max() <= MAX_LEVELS, ((w, h, s), d.max())
        assert (d > 0).mean() < 5e-3, ((w, h, s), (d > 0).mean())


@pytest.mark.parametrize("size", [224, 768])
def test_matches_pil_on_demo_photographs(size):
    assert len(DEMO) >= 30
    total, count = 0.0, 0
    for p in DEMO:
        with Image.open(p) as im:
            src = np.asarray(im.convert("RGB"))
        d = np.abs(_ours(src, size) - _pil(src, size))
        assert d.max() <= MAX_LEVELS, (p, d.max())
        total, count = total + d.sum(), count + d.size
    assert total / count < 0.02  # grey levels (measured 0.004 at 224 px)


def test_a_one_pass_float_resize_or_the_wrong_order_would_fail(monkeypatch):
    """The bound tells PIL's rounded intermediate (and its pass order) apart (not vacuous)."""
    up = _noise(5, 7, 0)  # upsampling: PIL clips the intermediate's overshoot
    assert np.abs(_ours(up, 64, fn=_one_pass_float) - _pil(up, 64)).max() > 10  # measured 20
    if pil_resize.PILLOW_PICKS_ORDER:
        tall = _noise(18, 283, 0)
        assert pil_vertical_first(18, 283, 96, 96)
        monkeypatch.setattr(pil_resize, "PILLOW_PICKS_ORDER", False)  # horizontal first
        assert np.abs(_ours(tall, 96) - _pil(tall, 96)).max() > 5  # measured 10


def test_inputs_and_identity():
    src = _noise(40, 30, 3)
    x = torch.from_numpy(src.copy()).permute(2, 0, 1)[None]
    out = resize_like_pil(x, (30, 40))
    assert out.dtype == torch.float32 and torch.equal(out, x.float())  # no pass: unchanged
    assert torch.equal(resize_like_pil(x, (16, 16)), resize_like_pil(x.float(), (16, 16)))
    batch = torch.cat([x, x.flip(-1)])
    got = resize_like_pil(batch, (20, 50))
    assert got.shape == (2, 3, 20, 50)
    assert torch.equal(got[1], resize_like_pil(x.flip(-1), (20, 50))[0])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        resize_like_pil(x[0], (16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_pil():
    for i, (w, h, s) in enumerate(SHAPES):
        src = _noise(w, h, i)
        d = np.abs(_ours(src, s, device="cuda") - _pil(src, s))
        assert d.max() <= MAX_LEVELS, ((w, h, s), d.max())
        assert (d > 0).mean() < 5e-3, ((w, h, s), (d > 0).mean())
