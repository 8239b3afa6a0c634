"""NumPy reference of PIL's bicubic resize and the ImageNet normalisation (for parity tests).

Written from Pillow's ``libImaging/Resample.c`` algorithm, independently of PIL's code path:
separable convolution in two passes (see ``order`` below); the kernel is the cubic with
a = -0.5 on support 2, stretched by the scale factor when downsampling (antialias); per output
pixel the taps are normalised to sum 1 and converted to fixed point with 22 fractional bits
(PRECISION_BITS = 32 - 8 - 2), the accumulator starts at 0.5 (1 << 21), and each pass rounds
and clips to uint8. torchvision has no CPU wheel for torch 2.13 here, so this reference stands
in for torchvision's ``Resize`` (which calls PIL for PIL images).
"""

from __future__ import annotations

import math

import numpy as np

from mmcap.data.pil_resize import pil_vertical_first

PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first tap index, tap count, int64 fixed-point taps [out, ksize]) for one axis."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support is 2
    ksize = math.ceil(support) * 2 + 1
    xmins = np.zeros(out_size, np.int64)
    counts = np.zeros(out_size, np.int64)
    taps = np.zeros((out_size, ksize), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C truncation of a positive number
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = _bicubic((np.arange(xmax) + xmin - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        # C: (int)(0.5 + w * 2^22) for w >= 0, (int)(-0.5 + w * 2^22) otherwise (truncation).
        fixed = np.where(w < 0, w * (1 << PRECISION_BITS) - 0.5, w * (1 << PRECISION_BITS) + 0.5)
        taps[xx, :xmax] = np.trunc(fixed).astype(np.int64)
        xmins[xx], counts[xx] = xmin, xmax
    return xmins, counts, taps


def _pass(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample uint8 ``img`` [H, W, C] along ``axis`` (1 = horizontal, 0 = vertical)."""
    in_size = img.shape[axis]
    xmins, counts, taps = _coefficients(in_size, out_size)
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # [in, other, C]
    out = np.empty((out_size,) + src.shape[1:], np.int64)
    for xx in range(out_size):
        lo, n = xmins[xx], counts[xx]
        acc = np.full(src.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
        acc += np.tensordot(taps[xx, :n], src[lo : lo + n], axes=(0, 0))
        out[xx] = acc >> PRECISION_BITS  # arithmetic shift, as C's >> on a signed int
    return np.moveaxis(np.clip(out, 0, 255).astype(np.uint8), 0, axis)


def pil_bicubic_resize_ref(
    img: np.ndarray, size: tuple[int, int], order: str = "pil"
) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [h, w, C] with ``size = (w, h)``, as ``PIL.Image.resize``.

    ``order``: "hv" = horizontal pass first (Pillow up to 12.x, always), "vh" = vertical first,
    "pil" = the installed Pillow's choice (13+: vertical first when the height shrinks by more
    than twice as many pixels as the width; :func:`mmcap.data.pil_resize.pil_vertical_first`).
    The 8-bit intermediate makes the two orders differ by a few grey levels.
    """
    w, h = size
    if order == "pil":
        order = "vh" if pil_vertical_first(img.shape[1], img.shape[0], w, h) else "hv"
    elif order not in ("hv", "vh"):
        raise ValueError(f"order must be 'pil', 'hv' or 'vh', got {order!r}")
    out = img
    for axis in (1, 0) if order == "hv" else (0, 1):
        target = w if axis == 1 else h
        if out.shape[axis] != target:
            out = _pass(out, target, axis=axis)
    return out


def normalize_ref(img: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [H, W, 3] -> float64 [3, H, W]: /255, minus mean, over std."""
    x = img.astype(np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean, np.float64)[:, None, None]) / np.asarray(std, np.float64)[
        :, None, None
    ]
