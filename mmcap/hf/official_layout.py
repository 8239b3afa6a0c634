"""mmcap checkpoint -> the paper's released-model layout (``tools/convert_to_hf.py --layout
official``): the original Florence-2 remote-code keys and ``config.json`` of the official
implementation (SYSTEM.md "The official checkpoint layout"), so that its scripts
(``model_cls.from_pretrained(DIR)`` in train.py / eval_loss.py) load a model trained with mmcap.

It is the exact inverse of :func:`mmcap.hf.convert_official.import_official`: the same
declarative key tables (vision ``hf_keys``, ``florence2_keys``, ``gemma2_keys``) in the other
direction, and a config holding every field the import reads. Facts the official code
hard-codes are checked, not silently dropped: a model that differs there (a Florence decoder
without the logit soft-cap 30, a Gemma layer pattern other than the official alternation, two
BART stacks of different shape) raises :class:`CheckpointError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from mmcap.config import IGNORE_INDEX, ModelConfig
from mmcap.config.presets import FLORENCE_FINAL_LOGIT_SOFTCAP
from mmcap.hf.convert_in import OFFICIAL_DECODER_PREFIX, TOKENIZER_FILES
from mmcap.hf.florence2_keys import bart_to_hf
from mmcap.hf.gemma2_keys import gemma2_to_hf
from mmcap.hf.io import CheckpointError, atomic_output_dir
from mmcap.model.vision import vision_to_hf

LM_HEAD = "language_model.lm_head.weight"
# BART tokenizer specials of the encoder (SYSTEM.md: encoder_bos / _pad / _eos 0 / 1 / 2).
BART_BOS, BART_EOS = 0, 2
BART_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, what the official BART layers use
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _must_hold(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"official layout: {field_name}: {msg}")


def _check(model: ModelConfig) -> None:
    """The official classes hard-code these; a model that differs cannot be written."""
    v, e, d = model.vision, model.encoder, model.decoder
    defaults = {f.name: f.default for f in dataclasses.fields(type(v))}
    for name in ("mlp_ratio", "qkv_bias", "in_channels"):
        _must_hold(
            getattr(v, name) == defaults[name],
            f"vision.{name}",
            f"the official DaViT fixes it at {defaults[name]!r}, the model has "
            f"{getattr(v, name)!r}",
        )
    _must_hold(
        e.layer_norm_eps == BART_LAYER_NORM_EPS,
        "encoder.layer_norm_eps",
        f"the official BART uses {BART_LAYER_NORM_EPS}",
    )
    if d.arch == "bart":
        for name in ("hidden_size", "max_position_embeddings", "activation", "scale_embedding"):
            a, b = getattr(e, name), getattr(d, name)
            _must_hold(
                a == b,
                f"decoder.{name}",
                f"one official text_config describes both BART stacks: encoder {a!r} vs "
                f"decoder {b!r}",
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "init_std"):
            _must_hold(
                getattr(e, name) == getattr(d, name), f"decoder.{name}", "must equal the encoder's"
            )
        _must_hold(
            d.final_logit_softcap == FLORENCE_FINAL_LOGIT_SOFTCAP,
            "decoder.final_logit_softcap",
            f"the official Florence-2 language model hard-codes {FLORENCE_FINAL_LOGIT_SOFTCAP}, "
            f"the model has {d.final_logit_softcap}",
        )
        _must_hold(
            d.norm_eps == BART_LAYER_NORM_EPS, "decoder.norm_eps", f"must be {BART_LAYER_NORM_EPS}"
        )
        return
    _must_hold(d.gated_cross_attention, "decoder.gated_cross_attention", "must be true")
    _must_hold(
        d.activation == "gelu_tanh", "decoder.activation", "the official Gemma-2 uses gelu_tanh"
    )
    official = tuple(
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(d.num_layers)
    )
    _must_hold(
        d.resolved_layer_types == official,
        "decoder.layer_types",
        "the official Gemma-2 decoder slides on even layers (is_sliding = not layer_idx % 2)",
    )


def _vision_config(model: ModelConfig) -> dict:
    v = model.vision
    return {
        "model_type": "davit",
        "drop_path_rate": v.drop_path_rate,
        "patch_size": list(v.patch_size),
        "patch_stride": list(v.patch_stride),
        "patch_padding": list(v.patch_padding),
        "patch_prenorm": list(v.patch_prenorm),
        "enable_checkpoint": False,
        "dim_embed": list(v.embed_dim),
        "num_heads": list(v.num_heads),
        "num_groups": list(v.num_groups),
        "depths": list(v.depths),
        "window_size": v.window_size,
        "projection_dim": v.projection_dim,
        "visual_temporal_embedding": {
            "type": "COSINE",
            "max_temporal_embeddings": v.max_temporal_embeddings,
        },
        "image_pos_embed": {
            "type": "learned_abs_2d",
            "max_pos_embeddings": v.max_position_embeddings,
        },
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }


def _gemma_config(model: ModelConfig) -> dict:
    d = model.decoder
    scalar = d.query_pre_attn_scalar
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.ffn_hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
        "sliding_window": d.sliding_window,
        "attn_logit_softcapping": d.attn_logit_softcap,
        "final_logit_softcapping": d.final_logit_softcap,
        "max_position_embeddings": d.max_position_embeddings,
        "rms_norm_eps": d.norm_eps,
        "rope_theta": d.rope_theta,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": d.attention_dropout,
        "initializer_range": d.init_std,
        "pad_token_id": d.pad_token_id,
        "eos_token_id": d.eos_token_id,
        "bos_token_id": d.bos_token_id,
        "decoder_start_token_id": d.decoder_start_token_id,
        "tie_word_embeddings": True,
        "cache_implementation": "hybrid",
        "use_cache": True,
        "encoder_hidden_size": d.encoder_hidden_size,
        "encoder_attn_every_x_layers": 1,
    }


def official_config(model: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of the official layout (fields as in the official
    data/pretrained/*/config.json; top-level and text_config ids are the decoder's)."""
    _check(model)
    e, d = model.encoder, model.decoder
    florence = d.arch == "bart"
    dec = d if florence else None  # Gemma sizes: the BART decoder fields mirror the encoder
    ids = {
        "pad_token_id": d.pad_token_id,
        "bos_token_id": d.bos_token_id,
        "eos_token_id": d.eos_token_id,
        "decoder_start_token_id": d.decoder_start_token_id,
        "forced_bos_token_id": d.bos_token_id,
        "forced_eos_token_id": d.eos_token_id,
    }
    text = {
        "model_type": "florence2_language",
        "use_encoder_tokenizer": True,  # separate encoder (BART) and decoder (Gemma) tables
        "tie_encoder_decoder": False,
        "tie_word_embeddings": True,
        "encoder_bos_token_id": BART_BOS,
        "encoder_eos_token_id": BART_EOS,
        "encoder_pad_token_id": e.pad_token_id,
        "encoder_vocab_size": e.padded_vocab_size,
        "vocab_size": d.vocab_size,
        "activation_dropout": e.activation_dropout,
        "activation_function": e.activation,
        "add_bias_logits": False,
        "add_final_layer_norm": False,
        "attention_dropout": e.attention_dropout,
        "d_model": e.hidden_size,
        "encoder_layers": e.num_layers,
        "encoder_attention_heads": e.num_attention_heads,
        "encoder_ffn_dim": e.ffn_hidden_size,
        "decoder_layers": (dec or e).num_layers,
        "decoder_attention_heads": (dec or e).num_attention_heads,
        "decoder_ffn_dim": (dec or e).ffn_hidden_size,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "dropout": e.dropout,
        "init_std": e.init_std,
        "is_encoder_decoder": True,
        "max_position_embeddings": e.max_position_embeddings,
        "normalize_before": False,
        "num_hidden_layers": e.num_layers,
        "scale_embedding": e.scale_embedding,
        # Florence-2's generation defaults, as in every official config.
        "early_stopping": True,
        "no_repeat_ngram_size": 3,
        "num_beams": 3,
        **ids,
    }
    if not florence:
        text["gemma_config"] = _gemma_config(model)
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "model_type": "florence2",
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "ignore_index": IGNORE_INDEX,
        "encoder_vocab_size": e.padded_vocab_size,
        "vocab_size": d.vocab_size,
        "projection_dim": model.vision.projection_dim,
        "torch_dtype": DTYPE_NAMES[dtype],
        **ids,
        "text_config": text,
        "vision_config": _vision_config(model),
    }


def official_state_dict(
    model: ModelConfig, ours: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Official-layout tensors of the mmcap model's full tensors (CaptioningModel global
    names): vision namespaces, ``language_model.model.{encoder,decoder}.`` and the tied
    ``language_model.lm_head.weight`` (written as its own copy: safetensors keeps no aliases)."""
    _check(model)
    vision = {k[len("vision.") :]: t for k, t in ours.items() if k.startswith("vision.")}
    out = vision_to_hf(
        vision, "official", max_temporal_embeddings=model.vision.max_temporal_embeddings
    )
    florence = model.decoder.arch == "bart"
    out.update(bart_to_hf(ours, model, "official", with_decoder=florence))
    if not florence:
        dec = {k[len("decoder.") :]: t for k, t in ours.items() if k.startswith("decoder.")}
        out.update(
            gemma2_to_hf(
                dec, model.decoder, prefix=OFFICIAL_DECODER_PREFIX, with_xattn=True, lm_head=None
            )
        )
    out[LM_HEAD] = out[OFFICIAL_DECODER_PREFIX + "embed_tokens.weight"]
    return out


def export_official(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the official-layout directory of an mmcap checkpoint (any TP/PP layout):
    ``config.json``, safetensors shards (+ index when sharded) and the checkpoint's BART
    tokenizer files. The directory appears only when complete."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from mmcap.checkpoint import resolve_checkpoint_dir
    from mmcap.checkpoint.inference_assets import tokenizers_in
    from mmcap.hf.convert_out import load_full_checkpoint

    model_cfg, _, ours = load_full_checkpoint(ckpt_dir)
    config = official_config(model_cfg, dtype)
    tensors = {
        k: t.detach().to(dtype).clone().contiguous()
        for k, t in official_state_dict(model_cfg, ours).items()
    }
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(tmp / filename), {"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        # A training checkpoint's inference/encoder, or a conversion's tokenizer/.
        found = tokenizers_in(resolve_checkpoint_dir(ckpt_dir))
        tok = found.encoder_dir if found is not None else Path(ckpt_dir) / "tokenizer"
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, tmp / name)
    return Path(out)
