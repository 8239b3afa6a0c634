"""Generation on mmcap's own model: KV cache, greedy and beam search (HF semantics)."""

from mmcap.generate.config import GenerationConfig
from mmcap.generate.generator import DecoderStepper, decoder_prompt, generate, generate_group
from mmcap.generate.kv_cache import KVCache, attach_kv_cache
from mmcap.generate.search import beam_search, greedy_search

__all__ = [
    "DecoderStepper",
    "GenerationConfig",
    "KVCache",
    "attach_kv_cache",
    "beam_search",
    "decoder_prompt",
    "generate",
    "generate_group",
    "greedy_search",
]
