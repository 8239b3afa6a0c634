"""Registers mmcap's captioner with transformers' Auto classes (imported for its side effect).

After ``import mmcap.hf.register`` (``mmcap.hf`` imports it), a directory written by
``save_pretrained`` loads with ``AutoConfig`` / ``AutoModel`` /
``AutoModelForImageTextToText`` / ``AutoModelForPreTraining`` (the Auto classes that map
transformers' native Florence-2) and ``AutoModelForSeq2SeqLM``, and its processor with
``AutoProcessor``, with no ``trust_remote_code``.
:func:`register` is idempotent: importing twice, or calling it again, is a no-op.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
)

from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration, MmcapCaptionerModel
from mmcap.hf.processing_mmcap import MmcapCaptionerProcessor

# Auto class -> model class registered for MmcapCaptionerConfig.
AUTO_MODEL_CLASSES = (
    (AutoModel, MmcapCaptionerModel),
    (AutoModelForImageTextToText, MmcapCaptionerForConditionalGeneration),
    (AutoModelForPreTraining, MmcapCaptionerForConditionalGeneration),
    (AutoModelForSeq2SeqLM, MmcapCaptionerForConditionalGeneration),
)


def register() -> None:
    """Register config and model classes with the Auto classes (safe to call repeatedly)."""
    # exist_ok=True: a second registration of the same classes is not an error.
    AutoConfig.register(MmcapCaptionerConfig.model_type, MmcapCaptionerConfig, exist_ok=True)
    for auto_class, model_class in AUTO_MODEL_CLASSES:
        auto_class.register(MmcapCaptionerConfig, model_class, exist_ok=True)
    AutoProcessor.register(MmcapCaptionerConfig, MmcapCaptionerProcessor, exist_ok=True)


register()

__all__ = ["AUTO_MODEL_CLASSES", "register"]
