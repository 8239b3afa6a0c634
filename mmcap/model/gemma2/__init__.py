"""Gemma-2 decoder with gated cross-attention, on megatron-core tensor-parallel layers."""

from mmcap.model.gemma2.decoder import IGNORE_INDEX, Gemma2Decoder

__all__ = ["IGNORE_INDEX", "Gemma2Decoder"]
