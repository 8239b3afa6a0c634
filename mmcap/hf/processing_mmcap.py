"""Processor of mmcap's captioners: task strings + images -> encoder inputs; Gemma ids -> text.

Builds inputs the way mmcap does (SYSTEM.md "Tasks and prompts"):

- prompt text from the task string (``"<LANG_DE><CAPTION>"`` -> "The target language is German.
  What does the image describe?", :func:`mmcap.data.prompts.build_prompt`), tokenised with the
  Florence-2 BART tokenizer as ``<s> ... </s>`` (``tokenizer``), optionally cropped to
  ``max_prompt_tokens`` the way mmcap's collate crops (``ids[:L]``), right-padded with BART
  ``<pad>``;
- ``input_ids`` = ``num_image_tokens`` copies of ``image_token_id``, then the prompt ids (the
  model scatters the image features into the placeholders);
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
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        decoder_tokenizer=None,
        num_image_tokens: int | None = None,
        image_token_id: int = 51289,
        **kwargs,
    ):
        if num_image_tokens is None:
            if image_processor is None:
                raise ValueError("pass num_image_tokens or an image_processor to derive it from")
            num_image_tokens = num_image_tokens_for(image_processor.size["height"])
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, decoder_tokenizer, **kwargs)

    def prompt_ids(self, tasks: list[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
        """BART ids ``<s> ... </s>`` of each task string's prompt, cropped to ``max_prompt_tokens``."""
        from mmcap.data.prompts import build_prompt  # lazy: mmcap.data is not needed to load

        texts = [build_prompt(t) for t in tasks]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [x[:max_prompt_tokens] if max_prompt_tokens else x for x in ids]

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
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Encoder inputs for task strings ``text`` and ``images`` (one image per task string).

        Args:
            images: PIL images / arrays, one per sample.
            text: task strings, e.g. ``"<LANG_DE><CAPTION>"`` or ``"<LANG_FR><TRANSLATE>A dog."``.
            targets: optional target texts -> ``labels`` (Gemma ids, -100 padding).
            max_prompt_tokens: crop prompt ids to this many tokens (mmcap trains with 128).
            return_tensors: only "pt".

        Returns:
            BatchFeature with ``input_ids`` and ``attention_mask`` [B, num_image_tokens + Lp],
            ``pixel_values`` [B, 3, S, S] when images are given, ``labels`` [B, Lt] with targets.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if text is None:
            raise ValueError("text (task strings such as '<LANG_EN><CAPTION>') is required")
        tasks = [text] if isinstance(text, str) else list(text)
        prompts = self.prompt_ids(tasks, max_prompt_tokens)
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        n_img = self.num_image_tokens
        input_ids = torch.full((len(prompts), n_img + longest), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        input_ids[:, :n_img] = self.image_token_id
        for i, p in enumerate(prompts):
            input_ids[i, n_img : n_img + len(p)] = torch.tensor(p)
            attention_mask[i, : n_img + len(p)] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images is not None:
            pixel = self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
            if pixel.shape[0] != len(tasks):
                raise ValueError(f"{pixel.shape[0]} images for {len(tasks)} task strings")
            data["pixel_values"] = pixel
        if targets is not None:
            tids = self.target_ids([targets] if isinstance(targets, str) else targets)
            if len(tids) != len(tasks):
                raise ValueError(f"{len(tids)} targets for {len(tasks)} task strings")
            labels = torch.full((len(tids), max(len(t) for t in tids)), IGNORE_INDEX, dtype=torch.long)
            for i, t in enumerate(tids):
                labels[i, : len(t)] = torch.tensor(t)
            data["labels"] = labels
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
