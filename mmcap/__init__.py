"""mmcap: Megatron-style training of multilingual image-captioning models (Florence-2 / Gemma-2)."""

__version__ = "0.1.0"
