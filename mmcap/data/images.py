"""JPEG bytes -> normalised image tensors, behind one interface with three back-ends.

Every back-end returns float32 ``[B, 3, S, S]``: RGB, bicubic resize to (S, S), scaled to
[0, 1], normalised with ImageNet mean/std (SYSTEM.md "Tasks and prompts"; the official
transform is torchvision ``Resize((S, S), interpolation=BICUBIC)`` on a PIL image, i.e.
``PIL.Image.resize(BICUBIC)``, then ``ToTensor`` and ``Normalize``).

- ``pil``: PIL on the CPU (DataLoader workers); bit-identical to the official transform.
- ``torchvision``: ``torchvision.io.decode_jpeg(device="cuda")`` on the whole batch (nvjpeg),
  PIL's two-pass bicubic resize on the GPU (:mod:`mmcap.data.pil_resize`, grouped by source
  size), normalise on the GPU.
- ``dali``: NVIDIA DALI, ``fn.external_source`` -> ``fn.decoders.image`` (``device="cpu"`` in
  a CPU-only pipeline, or ``"mixed"``: nvjpeg; ``ImageConfig.dali_device``) -> two
  ``fn.resize`` passes (cubic, antialias, uint8 between them as PIL) ->
  ``fn.crop_mirror_normalize``. Its CPU pipeline runs in CI against ``pil``
  (tests/data/test_images_dali.py states the measured differences).

The GPU back-ends decode with nvjpeg, which differs from libjpeg (PIL) by a few grey levels
(more at image borders and chroma edges: up to 16 levels measured on an H200, 2026-11-29);
``tools/bench_data.py`` reports the differences.
"""

from __future__ import annotations

import abc
import importlib.util
import io
import logging
import os

import numpy as np
import torch

from mmcap.data.config import ImageConfig
from mmcap.data.pil_resize import PILLOW_PICKS_ORDER, resize_like_pil
from mmcap.data.records import pil_load_truncated

log = logging.getLogger(__name__)

try:
    import torchvision  # noqa: F401
    from torchvision.io import ImageReadMode, decode_jpeg

    HAVE_TORCHVISION = True
except ImportError:  # no CPU torchvision wheel for torch 2.13 on the dev machines
    HAVE_TORCHVISION = False
try:  # found, not imported: importing DALI costs ~0.5 s in every process that imports this
    HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
except ImportError:  # no "nvidia" package at all
    HAVE_DALI = False


def normalize_(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, ToTensor (/255) then Normalize, the official op order."""
    x = x.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


class ImageDecoder(abc.ABC):
    """Decodes a list of JPEG byte strings into a normalised ``[B, 3, S, S]`` float tensor.

    Args:
        cfg: output size, mean/std, device of the GPU back-ends.
    """

    name = "base"
    supports_tolerant = False  # takes ``tolerant`` and counts ``failures`` (PILDecoder's)

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        """Normalised float images [n, 3, S, S] from JPEG bytes."""


class PILDecoder(ImageDecoder):
    """PIL decode + ``Image.resize((S, S), BICUBIC)`` on the CPU."""

    name = "pil"
    supports_tolerant = True

    def __init__(self, cfg: ImageConfig, tolerant: bool = False):
        super().__init__(cfg)
        self.tolerant = tolerant
        self.failures = 0  # images that failed to decode (tolerant mode)

    def resize_uint8(self, jpeg: bytes) -> np.ndarray:
        """uint8 [S, S, 3] after decode and resize (what the official transform sees)."""
        from PIL import Image

        s = self.cfg.size
        with Image.open(io.BytesIO(jpeg)) as im, pil_load_truncated(self.cfg.load_truncated):
            im = im.convert("RGB")
            if im.size != (s, s):
                im = im.resize((s, s), Image.BICUBIC)
            return np.asarray(im)

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        from PIL import Image

        s = self.cfg.size
        out = np.empty((len(jpegs), s, s, 3), dtype=np.uint8)
        for i, jpeg in enumerate(jpegs):
            try:
                out[i] = self.resize_uint8(jpeg)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # Training (``tolerant``): a broken image must not kill the run. It becomes the
                # mean colour (zeros after normalisation) and is counted; preprocessing with
                # image verification (the default) keeps such images out in the first place.
                if not self.tolerant:
                    raise
                self.failures += 1
                log.warning("image %d of a batch failed to decode (%s); using a blank image", i, e)
                out[i] = np.round(np.asarray(self.cfg.mean) * 255).astype(np.uint8)
        return normalize_(torch.from_numpy(out).permute(0, 3, 1, 2), self.cfg.mean, self.cfg.std)


class TorchvisionDecoder(ImageDecoder):
    """Batched nvjpeg decode (``torchvision.io.decode_jpeg(device="cuda")``) + GPU resize.

    A batch nvjpeg cannot decode (corrupt, truncated, CMYK) is decoded by :class:`PILDecoder`
    instead, with its tolerance and failure count (``tolerant``: a broken image becomes blank
    and is counted in ``failures``; otherwise PIL's error names it), as the DALI back-end does.
    """

    name = "torchvision"
    supports_tolerant = True

    def __init__(self, cfg: ImageConfig, tolerant: bool = False):
        super().__init__(cfg)
        if not (HAVE_TORCHVISION and torch.cuda.is_available()):
            raise RuntimeError("the torchvision back-end needs torchvision and CUDA; use 'pil'")
        self.device = torch.device(cfg.device)
        self._fallback = PILDecoder(cfg, tolerant=tolerant)

    @property
    def failures(self) -> int:
        """Images that failed to decode (tolerant mode), counted by the PIL fallback."""
        return self._fallback.failures

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        s = self.cfg.size
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        try:  # one nvjpeg batched call; returns uint8 [3, H, W] CUDA tensors
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:
            log.warning(
                "nvjpeg could not decode a batch of %d images (%s); decoding it with PIL",
                len(jpegs),
                " ".join(str(e).split())[:300] or type(e).__name__,
            )
            return self._fallback(jpegs).to(self.device)
        out = torch.empty((len(images), 3, s, s), dtype=torch.float32, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape[1:]), []).append(i)
        for idx in by_size.values():
            # PIL's two uint8-rounded passes, in the installed Pillow's order.
            out[idx] = resize_like_pil(torch.stack([images[i] for i in idx]), (s, s))
        return normalize_(out, self.cfg.mean, self.cfg.std)


class DALIDecoder(ImageDecoder):
    """NVIDIA DALI pipeline fed from memory (the mmap image store) by ``fn.external_source``.

    ``fn.decoders.image`` on the CPU (``device_id=None``, a CPU-only pipeline) or on the GPU
    ("mixed": nvjpeg), chosen by ``cfg.dali_device``. The resize runs as PIL's does: one
    pass, rounded and clamped to uint8, then the other (both antialiased cubic, a = -0.5), in
    the order the installed Pillow picks per image (:mod:`mmcap.data.pil_resize`); one 2-D
    float resize instead differs from PIL by up to 20 grey levels at sharp edges (PIL's
    clamped 8-bit intermediate; measured on the demo photographs).

    A batch DALI cannot decode (corrupt, or a truncated JPEG that PIL loads with
    ``load_truncated``) is decoded by :class:`PILDecoder` instead, with its tolerance and its
    failure count: DALI raises for the whole batch and invalidates the pipeline, which is
    rebuilt.

    Args:
        cfg: image config. max_batch_size: largest batch passed in (DALI allocates for it).
        num_threads: DALI CPU worker threads (default: the usable cores, at most 8).
        tolerant: as :class:`PILDecoder` (a broken image becomes blank and is counted).
    """

    name = "dali"
    supports_tolerant = True

    def __init__(
        self,
        cfg: ImageConfig,
        max_batch_size: int = 1024,
        num_threads: int | None = None,
        tolerant: bool = False,
    ):
        super().__init__(cfg)
        if not HAVE_DALI:
            raise RuntimeError(
                "data.image.backend='dali' needs nvidia-dali (pip install "
                "nvidia-dali-cuda130==2.4.0, as in requirements-cpu.txt); or use backend 'pil'"
            )
        self.device = resolve_dali_device(cfg)
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads or min(8, len(os.sched_getaffinity(0)))
        if self.device == "gpu":
            dev = torch.device(cfg.device)
            self.device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None  # a CPU-only pipeline: no CUDA context, no GPU needed
        self._fallback = PILDecoder(cfg, tolerant=tolerant)
        self._pending: list[np.ndarray] = []
        self.pipe = self._build()

    @property
    def failures(self) -> int:
        """Images that failed to decode (tolerant mode), counted by the PIL fallback."""
        return self._fallback.failures

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        s, mean, std = self.cfg.size, self.cfg.mean, self.cfg.std

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipe():
            jpegs = fn.external_source(
                source=lambda: self._pending, batch=True, dtype=types.UINT8, name="jpegs"
            )
            # No EXIF rotation: the official PIL transform does not apply it either.
            images = fn.decoders.image(
                jpegs,
                device="cpu" if self.device == "cpu" else "mixed",
                output_type=types.RGB,
                adjust_orientation=False,
            )
            hw = fn.cast(images.shape(), dtype=types.FLOAT)  # [H, W, C] per sample
            in_h, in_w = hw[0], hw[1]
            cubic = dict(interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
            # PIL's two passes, each to uint8 (rounded, clamped), in the installed Pillow's
            # order per sample (mmcap.data.pil_resize): the first pass resizes one axis only.
            if PILLOW_PICKS_ORDER:
                shrink_h = in_h - s
                vfirst = fn.cast((shrink_h > 0) & (shrink_h > 2.0 * (in_w - s)), dtype=types.FLOAT)
                first_x = vfirst * in_w + (1.0 - vfirst) * s
                first_y = vfirst * s + (1.0 - vfirst) * in_h
            else:
                first_x, first_y = s, in_h
            images = fn.resize(images, resize_x=first_x, resize_y=first_y, **cubic)
            images = fn.resize(images, resize_x=s, resize_y=s, **cubic)
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255.0 * m for m in mean],
                std=[255.0 * v for v in std],
            )

        p = pipe()
        p.build()
        return p

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        if len(jpegs) > self.max_batch_size:
            raise ValueError(f"batch of {len(jpegs)} > max_batch_size {self.max_batch_size}")
        self._pending = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
        try:
            (out,) = self.pipe.run()
        except RuntimeError as e:
            self.pipe = self._build()  # DALI invalidates a pipeline after an operator error
            log.warning(
                "DALI could not decode a batch of %d images (%s); decoding it with PIL",
                len(jpegs),
                " ".join(str(e).split())[:300] or type(e).__name__,
            )
            result = self._fallback(jpegs)
            return result.to(self.cfg.device) if self.device == "gpu" else result
        finally:
            self._pending = []
        dense = out.as_tensor()  # [B, 3, S, S]
        if self.device == "cpu":
            return torch.from_numpy(np.array(dense))  # a copy: DALI reuses its buffers
        result = torch.empty(dense.shape(), dtype=torch.float32, device=self.cfg.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream())
        return result


def resolve_dali_device(cfg: ImageConfig) -> str:
    """"cpu" or "gpu" for ``cfg.dali_device`` ("auto": the GPU when ``cfg.device`` is a CUDA
    device and CUDA is available, else the CPU pipeline)."""
    cuda = torch.cuda.is_available()
    if cfg.dali_device == "auto":
        return "gpu" if cuda and torch.device(cfg.device).type == "cuda" else "cpu"
    if cfg.dali_device == "gpu" and not (cuda and torch.device(cfg.device).type == "cuda"):
        raise RuntimeError(
            f"data.image.dali_device='gpu' needs CUDA and a CUDA data.image.device (got "
            f"{cfg.device!r}, CUDA available: {cuda}); set data.image.dali_device to 'cpu' or "
            "'auto' for DALI's CPU pipeline"
        )
    return cfg.dali_device


BACKENDS = {"pil": PILDecoder, "torchvision": TorchvisionDecoder, "dali": DALIDecoder}


def available_backends() -> list[str]:
    out = ["pil"]
    if torch.cuda.is_available():
        out += (["torchvision"] if HAVE_TORCHVISION else []) + (["dali"] if HAVE_DALI else [])
    return out


def build_image_decoder(cfg: ImageConfig, tolerant: bool = False, **kwargs) -> ImageDecoder:
    """The configured back-end ("auto": dali > torchvision > pil among those available with
    CUDA; on a CPU-only machine "pil", faster there than DALI's CPU pipeline per core, see
    README). ``tolerant`` (training) reaches every back-end: pil, and the PIL fallback of
    torchvision and dali for a batch they cannot decode (a broken image becomes blank and is
    counted in ``decoder.failures``)."""
    name = cfg.backend
    if name == "auto":
        name = available_backends()[-1]
    cls = BACKENDS[name]
    if cls.supports_tolerant:
        kwargs["tolerant"] = tolerant
    decoder = cls(cfg, **kwargs)
    log.info("image decoder: %s at %d px", decoder.name, cfg.size)
    return decoder
