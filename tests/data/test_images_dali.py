"""The DALI back-end's CPU pipeline against the PIL reference (skipped where DALI is not
installed, e.g. the GPU machine, which cannot receive the ~200 MB wheel).

Measured 2026-11-30 (DALI 2.4.0, Pillow 13.0.0): DALI's CPU JPEG decode is bit-identical to
PIL's; the difference is the resize. With two passes, each rounded to uint8, in the order
Pillow 13 picks per image (mmcap.data.pil_resize), the 36 demo photographs differ from PIL by at
most 5 grey levels at 224 px (mean 0.007 levels) and 7 at 768 px (mean 0.003), at a few sharp
edges; the synthetic JPEGs by at most 4 (mean 0.017). Always horizontal first (Pillow 12's
order) it was 8 levels, mean 0.033 at 224 px; one 2-D float resize would differ by up to 20
levels (PIL clamps its 8-bit intermediate).
"""

import glob
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcap.data.config import BatchConfig, ImageConfig, SamplerConfig
from mmcap.data.images import HAVE_DALI, PILDecoder, build_image_decoder, resolve_dali_device
from mmcap.data.pil_resize import PILLOW_PICKS_ORDER
from mmcap.data.testing import make_jpeg

pytestmark = pytest.mark.skipif(not HAVE_DALI, reason="needs nvidia-dali (requirements-cpu.txt)")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEMO = sorted(glob.glob(str(Path(__file__).parents[2] / "examples/demo/images/*.jpg")))
# Bounds in normalised units: measured max 7 grey levels (demo, 768 px) -> allow 8; measured
# mean 0.007 levels (demo, 224 px) / 0.017 (synthetic) -> allow 0.1 levels.
MAX_TOL = 8 / 255 / min(STD)
MEAN_TOL = 0.1 / 255 / min(STD)


def _progressive(seed: int, size) -> bytes:
    with Image.open(io.BytesIO(make_jpeg(seed, size))) as im:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85, progressive=True)
    return buf.getvalue()


def _synthetic() -> list[bytes]:
    """Odd sizes, extreme aspect ratios, grayscale, CMYK, progressive, 4:2:0 and 4:4:4."""
    out = [make_jpeg(i, wh) for i, wh in enumerate([(63, 47), (333, 37), (17, 900), (768, 768)])]
    out += [make_jpeg(7, (41, 29), mode="L"), make_jpeg(8, (50, 31), mode="CMYK")]
    out += [_progressive(9, (301, 199))]
    with Image.open(io.BytesIO(make_jpeg(10, (97, 55)))) as im:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95, subsampling=0)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def demo_jpegs() -> list[bytes]:
    assert len(DEMO) >= 30, DEMO
    return [Path(p).read_bytes() for p in DEMO]


def _compare(jpegs, size):
    cfg = ImageConfig(size=size, backend="dali", device="cpu")
    dec = build_image_decoder(cfg)
    assert dec.name == "dali" and dec.device == "cpu"
    got, ref = dec(jpegs), PILDecoder(cfg)(jpegs)
    assert got.shape == ref.shape == (len(jpegs), 3, size, size)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.is_contiguous()
    diff = (got - ref).abs()
    per_image = diff.flatten(1).amax(1)
    assert per_image.max().item() <= MAX_TOL, per_image
    assert diff.mean().item() <= MEAN_TOL
    # Layout and normalisation, not only closeness: channel 0 is red in CHW order, and the
    # per-channel means agree (a swapped channel or a missing /std would be far off).
    torch.testing.assert_close(got.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=2e-3, rtol=0)
    return diff


@pytest.mark.parametrize("size", [224, 768])
def test_demo_photographs_match_pil(demo_jpegs, size):
    diff = _compare(demo_jpegs, size)
    if size == 224 and PILLOW_PICKS_ORDER:
        # Pillow 13's pass order per image: measured mean 0.007 levels; always horizontal
        # first (Pillow 12's order), 0.033.
        assert diff.mean().item() <= 0.015 / 255 / min(STD)


@pytest.mark.parametrize("size", [224, 768])
def test_synthetic_jpegs_match_pil(size):
    diff = _compare(_synthetic(), size)
    assert diff.max().item() <= 6 / 255 / min(STD)  # measured 4 levels (CMYK, 768 px)


def test_a_float_one_pass_resize_would_fail_the_bound(demo_jpegs):
    """The bound tells PIL's two-pass uint8 resize from a 2-D float one (not vacuous)."""
    from nvidia.dali import fn, pipeline_def, types

    src = [np.frombuffer(j, np.uint8) for j in demo_jpegs]

    @pipeline_def(batch_size=len(src), num_threads=2, device_id=None, exec_async=False)
    def one_pass():
        im = fn.decoders.image(fn.external_source(source=lambda: src, batch=True), device="cpu")
        return fn.resize(
            im, resize_x=224, resize_y=224, interp_type=types.INTERP_CUBIC, dtype=types.FLOAT
        )

    p = one_pass()
    p.build()
    (out,) = p.run()
    ref = PILDecoder(ImageConfig(size=224))
    worst = max(
        np.abs(np.array(t) - ref.resize_uint8(j).astype(np.float32)).max()
        for t, j in zip(out, demo_jpegs)
    )
    assert worst / 255 / min(STD) > MAX_TOL


def test_broken_images_are_counted_like_pil():
    good = make_jpeg(0, (64, 48))
    corrupt = b"\xff\xd8\xff" + bytes(200)  # JPEG signature, invalid marker
    truncated = good[: len(good) * 2 // 3]  # DALI fails; PIL loads it (load_truncated)
    cfg = ImageConfig(size=32, backend="dali", device="cpu")
    dec = build_image_decoder(cfg, tolerant=True)
    pil = PILDecoder(cfg, tolerant=True)
    batch = [good, corrupt, truncated, good]
    got = dec(batch)
    torch.testing.assert_close(got, pil(batch), rtol=0, atol=0)  # the PIL fallback
    assert dec.failures == pil.failures == 1
    # The pipeline is rebuilt after the failure and decodes the next batch itself.
    torch.testing.assert_close(dec([good]), got[:1], rtol=0, atol=MAX_TOL)
    assert dec.failures == 1
    strict = build_image_decoder(cfg)
    with pytest.raises(OSError):
        strict([good, corrupt])


def test_device_choice_and_errors():
    assert resolve_dali_device(ImageConfig(backend="dali", device="cpu")) == "cpu"
    assert resolve_dali_device(ImageConfig(backend="dali", dali_device="cpu")) == "cpu"
    if not torch.cuda.is_available():
        assert resolve_dali_device(ImageConfig(backend="dali")) == "cpu"  # device="cuda"
        with pytest.raises(RuntimeError, match="dali_device.*'cpu'"):
            build_image_decoder(ImageConfig(backend="dali", dali_device="gpu"))
        # "auto" stays PIL on a CPU-only machine (faster per core; README "Data")
        assert build_image_decoder(ImageConfig(backend="auto")).name == "pil"
    from mmcap.config import ConfigError

    with pytest.raises(ConfigError, match="dali_device"):
        ImageConfig(dali_device="cuda")


def test_loader_end_to_end(tmp_path):
    from mmcap.data.indexed import CaptionDataset
    from mmcap.data.loader import iterate_batches
    from mmcap.data.sampler import GroupIndex, TaskLangSampler
    from mmcap.data.testing import write_synthetic_dataset

    good = write_synthetic_dataset(tmp_path / "good", 8, jpeg=_progressive(1, (90, 70)))
    bad = write_synthetic_dataset(tmp_path / "bad", 8, jpeg=b"\xff\xd8\xff" + bytes(99))
    for path, failing in ((good, False), (bad, True)):
        ds = CaptionDataset(path)
        cfg = ImageConfig(size=48, backend="dali", device="cpu")
        sampler = TaskLangSampler([GroupIndex.from_dataset(ds)], SamplerConfig(global_batch_size=6))
        it = iterate_batches([ds], sampler, BatchConfig(), cfg, num_workers=0)
        ref = PILDecoder(cfg, tolerant=True)
        for step in range(2):
            batch = next(it)
            assert batch.step == step and batch.pixels.shape == (6, 3, 48, 48)
            expect = ref([ds.image_bytes(int(r)) for r in batch.image])
            assert (batch.pixels - expect).abs().max().item() <= MAX_TOL
            assert batch.decode_failures == (6 if failing else 0)
