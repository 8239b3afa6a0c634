"""JPEG bytes -> normalised image tensors, behind one interface with three back-ends.

Every back-end returns float32 ``[B, 3, S, S]``: RGB, bicubic resize to (S, S), scaled to
[0, 1], normalised with ImageNet mean/std (SYSTEM.md "Tasks and prompts"; the official
transform is torchvision ``Resize((S, S), interpolation=BICUBIC)`` on a PIL image, i.e.
``PIL.Image.resize(BICUBIC)``, then ``ToTensor`` and ``Normalize``).

- ``pil``: PIL on the CPU (DataLoader workers); bit-identical to the official transform.
- ``torchvision``: ``torchvision.io.decode_jpeg(device="cuda")`` on the whole batch (nvjpeg),
  antialiased bicubic resize on the GPU (grouped by source size), normalise on the GPU.
- ``dali``: NVIDIA DALI, ``fn.external_source`` -> ``fn.decoders.image(device="mixed")`` ->
  ``fn.resize`` (cubic, antialias) -> ``fn.crop_mirror_normalize``.

GPU back-ends resample in float without PIL's 8-bit intermediate, so they differ from ``pil``
by a few grey levels; ``tools/bench_data.py`` reports the maximum difference.
"""

from __future__ import annotations

import abc
import io
import logging

import numpy as np
import torch

from mmcap.data.config import ImageConfig
from mmcap.data.records import pil_load_truncated

log = logging.getLogger(__name__)

try:
    import torchvision  # noqa: F401
    from torchvision.io import decode_jpeg

    HAVE_TORCHVISION = True
except ImportError:  # no CPU torchvision wheel for torch 2.13 on the dev machines
    HAVE_TORCHVISION = False
try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
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

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        """Normalised float images [n, 3, S, S] from JPEG bytes."""


class PILDecoder(ImageDecoder):
    """PIL decode + ``Image.resize((S, S), BICUBIC)`` on the CPU."""

    name = "pil"

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
    """Batched nvjpeg decode (``torchvision.io.decode_jpeg(device="cuda")``) + GPU resize."""

    name = "torchvision"

    def __init__(self, cfg: ImageConfig):
        super().__init__(cfg)
        if not (HAVE_TORCHVISION and torch.cuda.is_available()):
            raise RuntimeError("the torchvision back-end needs torchvision and CUDA; use 'pil'")
        self.device = torch.device(cfg.device)

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        from torchvision.io import ImageReadMode

        s = self.cfg.size
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        # One nvjpeg batched call; returns uint8 [3, H, W] CUDA tensors.
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(images), 3, s, s), dtype=torch.float32, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape[1:]), []).append(i)
        for (h, w), idx in by_size.items():
            x = torch.stack([images[i] for i in idx]).float()
            if (h, w) != (s, s):
                # Antialiased bicubic (a = -0.5, PIL's kernel); round like PIL's uint8 output.
                x = torch.nn.functional.interpolate(
                    x, size=(s, s), mode="bicubic", antialias=True, align_corners=False
                )
                x = x.round_().clamp_(0, 255)
            out[idx] = x
        return normalize_(out, self.cfg.mean, self.cfg.std)


class DALIDecoder(ImageDecoder):
    """NVIDIA DALI pipeline fed from memory (the mmap image store) by ``fn.external_source``.

    Args:
        cfg: image config. max_batch_size: largest batch passed in (DALI allocates for it).
    """

    name = "dali"

    def __init__(self, cfg: ImageConfig, max_batch_size: int = 1024, num_threads: int = 4):
        super().__init__(cfg)
        if not (HAVE_DALI and torch.cuda.is_available()):
            raise RuntimeError("the dali back-end needs nvidia-dali and CUDA; use 'pil'")
        self.max_batch_size = max_batch_size
        dev = torch.device(cfg.device)
        self.device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        self._pending: list[np.ndarray] = []
        self.pipe = self._build(num_threads)

    def _build(self, num_threads: int):
        from nvidia.dali import fn, pipeline_def, types

        s, mean, std = self.cfg.size, self.cfg.mean, self.cfg.std

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=num_threads,
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
                jpegs, device="mixed", output_type=types.RGB, adjust_orientation=False
            )
            images = fn.resize(
                images, resize_x=s, resize_y=s, interp_type=types.INTERP_CUBIC, antialias=True
            )
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
        (out,) = self.pipe.run()
        dense = out.as_tensor()  # TensorGPU [B, 3, S, S]
        result = torch.empty(dense.shape(), dtype=torch.float32, device=self.cfg.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream())
        return result


BACKENDS = {"pil": PILDecoder, "torchvision": TorchvisionDecoder, "dali": DALIDecoder}


def available_backends() -> list[str]:
    out = ["pil"]
    if torch.cuda.is_available():
        out += (["torchvision"] if HAVE_TORCHVISION else []) + (["dali"] if HAVE_DALI else [])
    return out


def build_image_decoder(cfg: ImageConfig, **kwargs) -> ImageDecoder:
    """The configured back-end ("auto": dali > torchvision > pil among those available)."""
    name = cfg.backend
    if name == "auto":
        name = available_backends()[-1]
    decoder = BACKENDS[name](cfg, **kwargs)
    log.info("image decoder: %s at %d px", decoder.name, cfg.size)
    return decoder
