"""A JPEG that fails to decode during training becomes a blank (mean-colour) image and is
counted instead of killing the run; evaluation / strict decoding still raises."""

import pytest
import torch

from mmcap.data.config import ImageConfig
from mmcap.data.images import PILDecoder
from mmcap.data.testing import make_jpeg


def test_tolerant_decoder_counts_and_blanks():
    cfg = ImageConfig(size=32)
    good = make_jpeg(0)
    truncated = good[: len(good) // 3]
    dec = PILDecoder(cfg, tolerant=True)
    out = dec([good, b"not a jpeg", truncated])
    assert out.shape == (3, 3, 32, 32) and dec.failures >= 1
    # the garbage entry is the mean colour: ~0 after normalisation (uint8 rounding only)
    assert out[1].abs().max() < 0.02
    torch.testing.assert_close(out[0], PILDecoder(cfg)([good])[0])


def test_strict_decoder_raises():
    with pytest.raises(OSError):
        PILDecoder(ImageConfig(size=32))([b"not a jpeg"])
