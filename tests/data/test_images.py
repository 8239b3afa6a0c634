"""Image decoding: PIL back-end vs an independent NumPy reference; GPU back-ends vs PIL.

torchvision has no CPU wheel for torch 2.13 on these machines, so the CPU parity reference is
:mod:`mmcap.data.resize_ref` (Pillow's bicubic resample written out in NumPy) instead of
torchvision's transform (which calls ``PIL.Image.resize`` itself for PIL images).
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmcap.config import ConfigError
from mmcap.data.config import ImageConfig
from mmcap.data.images import HAVE_DALI, HAVE_TORCHVISION, PILDecoder, build_image_decoder
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
        refs = [pil_bicubic_resize_ref(src, (size, size), order) for order in ("hv", "vh")]
        # Bit-exact against the reference with one of the two pass orders (Pillow picks).
        assert any(np.array_equal(u8, r) for r in refs), (
            SIZES[i],
            [np.abs(u8.astype(int) - r).max() for r in refs],
        )
        np.testing.assert_allclose(got[i].numpy(), normalize_ref(u8, MEAN, STD), rtol=0, atol=2e-6)


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


# GPU back-ends: they resample in float (no 8-bit intermediate), so they may differ from PIL
# by a couple of grey levels; 4 levels / 255 / min(std) bounds that in normalised units.
GPU_TOL = 4 / 255 / min(STD)


def _gpu_vs_pil(backend):
    cfg = ImageConfig(size=224, backend=backend)
    jpegs = [make_jpeg(i, wh) for i, wh in enumerate(SIZES)]
    got = build_image_decoder(cfg)(jpegs).cpu()
    ref = PILDecoder(cfg)(jpegs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= GPU_TOL
    assert (got - ref).abs().mean().item() <= 0.25 * GPU_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="needs torchvision")
def test_torchvision_nvjpeg_vs_pil():
    _gpu_vs_pil("torchvision")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DALI, reason="needs nvidia-dali")
def test_dali_vs_pil():
    _gpu_vs_pil("dali")
