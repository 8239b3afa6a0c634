"""Processor of mmcap's captioners: task strings + images -> encoder inputs; Gemma ids -> text.

Builds inputs the way mmcap does (SYSTEM.md "Tasks and prompts"):

- prompt text from the task string (``"<LANG_DE><CAPTION>"`` -> "The target language is German.
  What does the image describe?", :func:`mmcap.data.prompts.build_prompt`), tokenised with the
  Florence-2 BART tokenizer as ``<s> ... </s>`` (``tokenizer``), optionally cropped to
  ``max_prompt_tokens`` the way mmcap's collate crops (``ids[:L]``), right-padded with BART
  ``<pad>``;
- ``input_ids`` = ``num_image_tokens`` copies of ``image_token_id``, then the prompt ids (the
  model scatters the image features into the placeholders); without images (text-only
  translation inputs) the prompt ids alone, as mmcap encodes text-only samples;
- the standard tokenizer kwargs (``padding``, ``truncation``, ``max_length``,
  ``return_tensors`` "pt" / "np" / None) act on the prompt ids as a Hugging Face tokenizer's;
- ``pixel_values``: RGB, bicubic resize to (S, S), [0, 1], ImageNet mean/std, done by
  ``CLIPImageProcessorPil`` (PIL on uint8, identical to the official torchvision-on-PIL
  transform; with torchvision installed, ``AutoImageProcessor`` may load the torchvision
  back-end instead, which differs by a few grey levels: pass ``backend="pil"`` to keep PIL);
- optional ``targets`` -> ``labels``: Gemma ids ``<bos> ... <eos>``, padded with -100;
- :meth:`batch_decode` / :meth:`decode` with the Gemma tokenizer (``decoder_tokenizer``).

The BART tokenizer is saved at the root of the directory, the Gemma one under
``decoder_tokenizer/`` (ProcessorMixin's layout for a second tokenizer).
"""

from __future__ import annotations

import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from mmcap.config import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_STRIDE = 32  # DaViT's total stride: an S-px image gives (S / 32)^2 grid tokens + 1 pooled


def num_image_tokens_for(image_size: int) -> int:
    """Image tokens of an ``image_size`` px image: 224 -> 50, 768 -> 577 (SYSTEM.md)."""
    if image_size % PATCH_STRIDE:
        raise ValueError(f"image_size must be a multiple of {PATCH_STRIDE}, got {image_size}")
    return 1 + (image_size // PATCH_STRIDE) ** 2


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Resize (S, S) bicubic, /255, ImageNet normalise, no crop (SYSTEM.md "Tasks and prompts")."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


class MmcapCaptionerProcessor(ProcessorMixin):
    """Image processor + BART prompt tokenizer + Gemma target tokenizer.

    Args:
        image_processor: e.g. :func:`build_image_processor` (``size`` gives S).
        tokenizer: the Florence-2 BART tokenizer (prompts).
        decoder_tokenizer: the Gemma-2 tokenizer (targets, decoding).
        num_image_tokens: image placeholders per sample (default from the image size).
        image_token_id: the placeholder id (the model config's ``image_token_id``).
        max_prompt_tokens: default prompt crop (mmcap trains with 128), None = no crop.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        decoder_tokenizer=None,
        num_image_tokens: int | None = None,
        image_token_id: int = 51289,
        max_prompt_tokens: int | None = None,
        **kwargs,
    ):
        if num_image_tokens is None:
            if image_processor is None:
                raise ValueError("pass num_image_tokens or an image_processor to derive it from")
            num_image_tokens = num_image_tokens_for(image_processor.size["height"])
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.max_prompt_tokens = max_prompt_tokens
        super().__init__(image_processor, tokenizer, decoder_tokenizer, **kwargs)

    def prompt_ids(
        self,
        tasks: list[str],
        max_prompt_tokens: int | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[list[int]]:
        """BART ids ``<s> ... </s>`` of each task string's prompt: the tokenizer's own
        ``truncation`` / ``max_length`` (``</s>`` kept), then mmcap's crop ``ids[:L]`` to
        ``max_prompt_tokens``."""
        from mmcap.data.prompts import build_prompt  # lazy: mmcap.data is not needed to load

        texts = [build_prompt(t) for t in tasks]
        ids = self.tokenizer(
            texts, add_special_tokens=True, truncation=truncation, max_length=max_length
        )["input_ids"]
        crop = max_prompt_tokens or self.max_prompt_tokens
        return [x[:crop] if crop else x for x in ids]

    def target_ids(self, targets: list[str]) -> list[list[int]]:
        """Gemma ids ``<bos> ... <eos>`` of each target text."""
        tok = self.decoder_tokenizer
        ids = tok(list(targets), add_special_tokens=False)["input_ids"]
        return [[tok.bos_token_id, *x, tok.eos_token_id] for x in ids]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        targets: str | list[str] | None = None,
        max_prompt_tokens: int | None = None,
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        image_placeholders: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Encoder inputs for task strings ``text``, with one image per task string or none.

        Args:
            images: PIL images / arrays, one per sample; None = text-only inputs (translation
                task strings: the encoder sees the prompt alone, as mmcap trains them).
            text: task strings, e.g. ``"<LANG_DE><CAPTION>"`` or ``"<LANG_FR><TRANSLATE>A dog."``.
            targets: optional target texts -> ``labels`` (Gemma ids, -100 padding).
            max_prompt_tokens: crop prompt ids to this many tokens as mmcap's collate does
                (``ids[:L]``; default: the crop the model was trained with, when exported from
                a training checkpoint).
            padding / truncation / max_length: as a Hugging Face tokenizer's, applied to the
                prompt ids (``max_length`` counts prompt tokens; the image placeholders come in
                front): ``True`` / ``"longest"`` (default), ``"max_length"``, ``False``.
            return_tensors: "pt" (default), "np" or None (Python lists).
            image_placeholders: put ``num_image_tokens`` placeholders in front of the prompt
                (default: when images are given); True with images passed to the model
                separately.

        Returns:
            BatchFeature with ``input_ids`` and ``attention_mask`` [B, num_image_tokens + Lp]
            (text-only: [B, Lp]), ``pixel_values`` [B, 3, S, S] when images are given,
            ``labels`` [B, Lt] with targets.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if text is None:
            raise ValueError("text (task strings such as '<LANG_EN><CAPTION>') is required")
        if image_placeholders is None:
            image_placeholders = images is not None
        elif images is not None and not image_placeholders:
            raise ValueError("images were given: image_placeholders=False would drop them")
        tasks = [text] if isinstance(text, str) else list(text)
        prompts = self.prompt_ids(tasks, max_prompt_tokens, truncation, max_length)
        enc = self.tokenizer.pad(
            {"input_ids": prompts},
            padding=padding,
            max_length=max_length if padding == "max_length" else None,
            return_tensors=None,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if return_tensors is not None and len({len(x) for x in ids}) > 1:
            raise ValueError(
                f"prompts of different lengths cannot make {return_tensors!r} tensors with "
                f"padding={padding!r}; pass padding=True, or return_tensors=None for lists"
            )
        if image_placeholders:
            n_img = self.num_image_tokens
            ids = [[self.image_token_id] * n_img + x for x in ids]
            mask = [[1] * n_img + m for m in mask]
        data = {"input_ids": ids, "attention_mask": mask}
        if images is not None:
            pixel = self.image_processor(images, return_tensors="np", **kwargs)["pixel_values"]
            if len(pixel) != len(tasks):
                raise ValueError(f"{len(pixel)} images for {len(tasks)} task strings")
            data["pixel_values"] = pixel
        if targets is not None:
            tids = self.target_ids([targets] if isinstance(targets, str) else targets)
            if len(tids) != len(tasks):
                raise ValueError(f"{len(tids)} targets for {len(tasks)} task strings")
            width = max(len(t) for t in tids) if padding not in (False, "do_not_pad") else 0
            data["labels"] = [t + [IGNORE_INDEX] * (width - len(t)) for t in tids]
            if return_tensors is not None and len({len(t) for t in data["labels"]}) > 1:
                raise ValueError(
                    f"targets of different lengths cannot make {return_tensors!r} tensors with "
                    f"padding={padding!r}; pass padding=True, or return_tensors=None for lists"
                )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Texts of generated Gemma id sequences."""
        return self.decoder_tokenizer.batch_decode(
            sequences, skip_special_tokens=skip_special_tokens, **kwargs
        )

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Text of one generated Gemma id sequence."""
        return self.decoder_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MmcapCaptionerProcessor",
    "build_image_processor",
    "num_image_tokens_for",
]
