"""Data pipeline: prompts, tokenizers, indexed storage, preprocessing, sampling, batches, images.

Submodules are imported on first use (``mmcap.data.CaptionDataset`` loads megatron-core, which
takes seconds; ``mmcap.data.prompts`` alone does not).
"""

import importlib

_EXPORTS = {
    "build_prompt": "prompts",
    "parse_task_string": "prompts",
    "task_lang_key": "prompts",
    "key_id": "prompts",
    "zero_shot_prefix": "prompts",
    "PRETRAINING_KEYS": "prompts",
    "FINETUNING_KEYS": "prompts",
    "TargetTokenizer": "tokenizers",
    "PromptTokenizer": "tokenizers",
    "PreprocessConfig": "config",
    "SamplerConfig": "config",
    "BatchConfig": "config",
    "ImageConfig": "config",
    "CaptionDataset": "indexed",
    "ShardWriter": "indexed",
    "preprocess": "preprocess",
    "GroupIndex": "sampler",
    "TaskLangSampler": "sampler",
    "TokenBatch": "collate",
    "collate_tokens": "collate",
    "build_image_decoder": "images",
    "CaptionBatch": "loader",
    "TokenBatchAssembler": "loader",
    "iterate_batches": "loader",
    "FeatureStore": "features",
    "cache_features": "features",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmcap.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmcap.data' has no attribute {name!r}")
