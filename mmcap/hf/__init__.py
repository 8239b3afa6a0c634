"""Hugging Face interoperability: key tables between transformers models and mmcap, the HF
model classes mmcap exports to, and checkpoint conversion.

Importing this package registers ``mmcap_captioner`` with transformers' Auto classes, so an
exported directory loads with ``AutoModelForImageTextToText.from_pretrained`` (no
trust_remote_code).
"""

from mmcap.hf import register  # noqa: F401  (side effect: Auto-class registration)
from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration, MmcapCaptionerModel
from mmcap.hf.processing_mmcap import MmcapCaptionerProcessor

__all__ = [
    "MmcapCaptionerConfig",
    "MmcapCaptionerForConditionalGeneration",
    "MmcapCaptionerModel",
    "MmcapCaptionerProcessor",
]
