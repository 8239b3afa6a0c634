"""Image decoding: PIL back-end vs an independent NumPy reference; GPU back-ends vs PIL.

torchvision has no CPU wheel for torch 2.13 on these machines, so the CPU parity reference is
:mod:`mmcap.data.resize_ref` (Pillow's bicubic resample written out in NumPy) instead of
torchvision's transform (which calls ``PIL.Image.resize`` itself for PIL images).
"""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmcap.config import ConfigError
from mmcap.data.config import ImageConfig
from mmcap.data.images import HAVE_DALI, HAVE_TORCHVISION, PILDecoder, build_image_decoder
from mmcap.data.pil_resize import PILLOW_PICKS_ORDER, pil_vertical_first
from mmcap.data.resize_ref import normalize_ref, pil_bicubic_resize_ref
from mmcap.data.testing import make_jpeg

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (width, height): down- and up-sampling, extreme aspect ratios (pass order matters), identity.
SIZES = [(64, 48), (300, 200), (50, 300), (333, 37), (224, 224), (500, 500), (17, 900)]


def _decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("size", [224, 96])
def test_pil_matches_numpy_reference(size):
    decoder = PILDecoder(ImageConfig(size=size))
    jpegs = [make_jpeg(i, wh) for i, wh in enumerate(SIZES)]
    got = decoder(jpegs)
    assert got.shape == (len(jpegs), 3, size, size) and got.dtype == torch.float32
    for i, jpeg in enumerate(jpegs):
        u8 = decoder.resize_uint8(jpeg)
        src = _decoded(jpeg)
        ref = pil_bicubic_resize_ref(src, (size, size))  # the installed Pillow's pass order
        assert np.array_equal(u8, ref), (SIZES[i], np.abs(u8.astype(int) - ref).max())
        np.testing.assert_allclose(got[i].numpy(), normalize_ref(u8, MEAN, STD), rtol=0, atol=2e-6)


@pytest.mark.skipif(not PILLOW_PICKS_ORDER, reason="Pillow < 13: horizontal pass first, always")
def test_pass_order_is_pillows():
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
    many pixels as the width; the reference follows, and the other order would not match."""
    rng = np.random.default_rng(0)
    orders = set()
    for w, h, s in [(195, 303, 96), (366, 494, 96), (18, 283, 96), (288, 464, 32), (90, 700, 64)]:
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise: the orders differ
        pil = np.asarray(Image.fromarray(src).resize((s, s), Image.BICUBIC))
        vfirst = pil_vertical_first(w, h, s, s)
        orders.add(vfirst)
        assert np.array_equal(pil, pil_bicubic_resize_ref(src, (s, s))), (w, h, s)
        other = pil_bicubic_resize_ref(src, (s, s), "hv" if vfirst else "vh")
        assert not np.array_equal(pil, other), (w, h, s)
    assert orders == {True, False}


def test_bilinear_would_fail_the_reference():
    """The reference tells bicubic from bilinear (the parity test is not vacuous)."""
    src = _decoded(make_jpeg(3, (300, 200)))
    bilinear = np.asarray(Image.fromarray(src).resize((224, 224), Image.BILINEAR))
    assert np.abs(bilinear.astype(int) - pil_bicubic_resize_ref(src, (224, 224))).max() > 2


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_become_rgb(mode):
    jpeg = make_jpeg(1, (40, 30), mode=mode)
    out = PILDecoder(ImageConfig(size=16))([jpeg])
    assert out.shape == (1, 3, 16, 16)
    ref = normalize_ref(pil_bicubic_resize_ref(_decoded(jpeg), (16, 16)), MEAN, STD)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=2e-6)


def test_config_and_registry():
    assert build_image_decoder(ImageConfig(backend="pil")).name == "pil"
    if not torch.cuda.is_available():
        assert build_image_decoder(ImageConfig(backend="auto")).name == "pil"
        with pytest.raises(RuntimeError, match="CUDA"):
            build_image_decoder(ImageConfig(backend="torchvision"))
    with pytest.raises(ConfigError, match="backend"):
        ImageConfig(backend="opencv")


# GPU back-ends decode with nvjpeg, not libjpeg: the two differ by a few grey levels, more
# at image borders and chroma edges (torchvision's own test of its CUDA decoder bounds only the
# mean difference to libjpeg, by 2 levels). Measured on an H200 (2026-11-29, torchvision's
# back-end, these images at 224 px): at most 16 levels. The resize itself is held to 2 levels
# of PIL's separately (tests/data/test_pil_resize.py); these bound the decode and the glue
# (layout, channel order, normalisation: any of them wrong is far beyond the mean bound).
LEVEL = 1 / 255 / min(STD)  # one grey level in normalised units (at most)


def _gpu_vs_pil(backend):
    cfg = ImageConfig(size=224, backend=backend)
    jpegs = [make_jpeg(i, wh) for i, wh in enumerate(SIZES)]
    got = build_image_decoder(cfg)(jpegs)
    assert got.is_cuda and got.dtype == torch.float32
    ref = PILDecoder(cfg)(jpegs)
    assert got.shape == ref.shape
    diff = (got.cpu() - ref).abs()
    assert diff.mean().item() <= 1.0 * LEVEL, diff.mean().item() / LEVEL
    assert diff.max().item() <= 32 * LEVEL, diff.max().item() / LEVEL


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="needs torchvision")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decode_vs_libjpeg():
    """nvjpeg's pixels against PIL's (libjpeg) before any resize."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [make_jpeg(i, wh) for i, wh in enumerate(SIZES)]
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    for jpeg, img in zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")):
        ref = torch.from_numpy(_decoded(jpeg).copy()).permute(2, 0, 1)
        assert img.shape == ref.shape
        d = (img.cpu().float() - ref.float()).abs()
        # torchvision's own bound for its CUDA decoder against libjpeg (grey levels, mean)
        assert d.mean().item() <= 2.0, (tuple(ref.shape), d.mean().item(), d.max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="needs torchvision")
def test_torchvision_nvjpeg_vs_pil():
    _gpu_vs_pil("torchvision")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DALI, reason="needs nvidia-dali")
def test_dali_vs_pil():
    _gpu_vs_pil("dali")


@pytest.fixture
def torchvision_on_cpu(monkeypatch):
    """The torchvision back-end on the CPU: a stand-in for nvjpeg's batched ``decode_jpeg``
    (PIL's pixels; like nvjpeg it raises for the whole batch when one image is broken), so the
    back-end's own code (size groups, resize, normalisation, fallback) runs here."""
    from mmcap.data import images

    calls = []

    def fake_decode_jpeg(data, mode, device):
        calls.append(len(data))
        out = []
        for t in data:
            try:
                out.append(torch.from_numpy(_decoded(t.numpy().tobytes()).copy()).permute(2, 0, 1))
            except Exception as e:  # noqa: BLE001 - nvjpeg reports every failure so
                raise RuntimeError(f"nvjpegDecode failed: {e}") from None
        return [x.to(device) for x in out]

    monkeypatch.setattr(images, "HAVE_TORCHVISION", True)
    monkeypatch.setattr(images, "decode_jpeg", fake_decode_jpeg, raising=False)
    monkeypatch.setattr(images, "ImageReadMode", SimpleNamespace(RGB="RGB"), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_torchvision_backend_glue_on_cpu(torchvision_on_cpu):
    cfg = ImageConfig(size=64, backend="torchvision", device="cpu")
    dec = build_image_decoder(cfg, tolerant=True)
    assert dec.name == "torchvision"
    jpegs = [make_jpeg(i, wh) for i, wh in enumerate(SIZES)] + [make_jpeg(9, (300, 200))]
    got, ref = dec(jpegs), PILDecoder(cfg)(jpegs)
    assert torchvision_on_cpu == [len(jpegs)]  # one batched decode call
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 2 / 255 / min(STD)  # resize_like_pil: 2 levels
    assert dec.failures == 0


def test_torchvision_backend_falls_back_to_pil(torchvision_on_cpu):
    cfg = ImageConfig(size=32, backend="torchvision", device="cpu")
    good = [make_jpeg(i, (80, 60)) for i in range(3)]
    broken = good[1][:40]  # a header and nothing else: PIL cannot load it either
    dec = build_image_decoder(cfg, tolerant=True)
    out = dec([good[0], broken, good[2]])
    assert dec.failures == 1 and out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out[[0, 2]], PILDecoder(cfg)([good[0], good[2]]), rtol=0, atol=0)
    assert out[1].abs().max().item() < 0.02  # blank: the mean colour, ~0 after normalisation
    strict = build_image_decoder(cfg)  # evaluation: not tolerant, PIL's error surfaces
    with pytest.raises(OSError):
        strict([good[0], broken])
