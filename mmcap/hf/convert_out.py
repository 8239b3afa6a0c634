"""mmcap distributed checkpoint -> Hugging Face directory (the library behind
``tools/convert_to_hf.py``).

The checkpoint (any TP/PP layout: megatron-core reshards on load) is loaded into a TP=PP=1
model in one process, mapped with the same declarative key tables the import uses, loaded
strictly into :class:`~mmcap.hf.modeling_mmcap.MmcapCaptionerForConditionalGeneration` and
saved with ``save_pretrained`` (safetensors shards + index), a generation config, both
tokenizers and the processor (from the checkpoint's ``inference/`` folder or tokenizers given
explicitly). The directory appears only when complete; without tokenizers the export refuses
(unless ``weights_only``), saying how to supply them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mmcap.checkpoint.inference_assets import (
    INFERENCE_DIR,
    INFO_FILE,
    TokenizerFiles,
    tokenizers_in,
)
from mmcap.config import ModelConfig
from mmcap.hf.florence2_keys import bart_to_hf
from mmcap.hf.gemma2_keys import gemma2_to_hf
from mmcap.hf.io import CheckpointError, atomic_output_dir
from mmcap.model.vision import vision_to_hf

HF_DECODER_PREFIX = "model.language_model.decoder."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_config(model: ModelConfig):
    """The :class:`MmcapCaptionerConfig` of an mmcap ModelConfig."""
    from transformers import BartConfig, Florence2VisionConfig, Gemma2Config

    from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig

    v, e, d = model.vision, model.encoder, model.decoder
    vision = Florence2VisionConfig(
        embed_dim=list(v.embed_dim),
        depths=list(v.depths),
        num_heads=list(v.num_heads),
        num_groups=list(v.num_groups),
        patch_size=list(v.patch_size),
        patch_stride=list(v.patch_stride),
        patch_padding=list(v.patch_padding),
        patch_prenorm=list(v.patch_prenorm),
        window_size=v.window_size,
        mlp_ratio=v.mlp_ratio,
        qkv_bias=v.qkv_bias,
        drop_path_rate=v.drop_path_rate,
        projection_dim=v.projection_dim,
        max_position_embeddings=v.max_position_embeddings,
        max_temporal_embeddings=v.max_temporal_embeddings,
    )
    florence = d.arch == "bart"
    if florence and (d.hidden_size, d.max_position_embeddings) != (
        e.hidden_size,
        e.max_position_embeddings,
    ):
        raise CheckpointError(
            "the BART encoder and decoder differ in width or positions; one "
            "BartConfig cannot describe both"
        )
    text = BartConfig(
        d_model=e.hidden_size,
        encoder_layers=e.num_layers,
        decoder_layers=d.num_layers if florence else e.num_layers,
        encoder_attention_heads=e.num_attention_heads,
        decoder_attention_heads=d.num_attention_heads if florence else e.num_attention_heads,
        encoder_ffn_dim=e.ffn_hidden_size,
        decoder_ffn_dim=d.ffn_hidden_size if florence else e.ffn_hidden_size,
        vocab_size=e.padded_vocab_size,
        max_position_embeddings=e.max_position_embeddings,
        activation_function=e.activation,
        dropout=e.dropout,
        attention_dropout=e.attention_dropout,
        activation_dropout=e.activation_dropout,
        scale_embedding=e.scale_embedding,
        init_std=e.init_std,
        pad_token_id=e.pad_token_id,
    )
    gemma = None
    if not florence:
        gemma = Gemma2Config(
            vocab_size=d.vocab_size,
            hidden_size=d.hidden_size,
            intermediate_size=d.ffn_hidden_size,
            num_hidden_layers=d.num_layers,
            num_attention_heads=d.num_attention_heads,
            num_key_value_heads=d.num_kv_heads,
            head_dim=d.head_dim,
            query_pre_attn_scalar=int(d.query_pre_attn_scalar),
            sliding_window=d.sliding_window,
            attn_logit_softcapping=d.attn_logit_softcap,
            final_logit_softcapping=d.final_logit_softcap,
            max_position_embeddings=d.max_position_embeddings,
            rms_norm_eps=d.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
            layer_types=list(d.resolved_layer_types),
            pad_token_id=d.pad_token_id,
            eos_token_id=d.eos_token_id,
            bos_token_id=d.bos_token_id,
        ).to_dict()
        gemma["encoder_hidden_size"] = d.encoder_hidden_size
    return MmcapCaptionerConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        gemma_config=gemma,
        decoder_family="florence" if florence else "gemma2",
        encoder_vocab_size=e.padded_vocab_size,
        decoder_vocab_size=d.vocab_size,
        image_token_id=e.vocab_size,
        pad_token_id=d.pad_token_id,
        eos_token_id=d.eos_token_id,
        bos_token_id=d.bos_token_id,
        decoder_start_token_id=d.decoder_start_token_id,
        final_logit_softcapping=d.final_logit_softcap if florence else None,
    )


def hf_state_dict(model: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors of the mmcap model's full tensors (CaptioningModel global names)."""
    vision = {k[len("vision.") :]: t for k, t in ours.items() if k.startswith("vision.")}
    out = vision_to_hf(vision, "hf", max_temporal_embeddings=model.vision.max_temporal_embeddings)
    florence = model.decoder.arch == "bart"
    out.update(bart_to_hf(ours, model, "hf", with_decoder=florence))
    if florence:
        out["lm_head.weight"] = out[HF_DECODER_PREFIX + "embed_tokens.weight"]
    else:
        dec = {k[len("decoder.") :]: t for k, t in ours.items() if k.startswith("decoder.")}
        out.update(
            gemma2_to_hf(
                dec,
                model.decoder,
                prefix=HF_DECODER_PREFIX,
                with_xattn=True,
                lm_head="lm_head.weight",
            )
        )
    return out


def load_full_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, metadata, full tensors) of a checkpoint of any TP/PP layout."""
    from mmcap.checkpoint import load_model_checkpoint, read_checkpoint_info, resolve_checkpoint_dir
    from mmcap.config import ParallelConfig, PrecisionConfig
    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import full_state_dict

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)  # a run directory: its newest checkpoint
    model_cfg, meta = read_checkpoint_info(ckpt_dir)
    initialize_model_parallel(ParallelConfig(), seed=0)
    # Weights only move here: the local layers (same parameter names as TE's) on the CPU.
    local = PrecisionConfig("fp32", transformer_impl="local")
    model = CaptioningModel(model_cfg, precision=local)
    load_model_checkpoint(model, ckpt_dir)
    return model_cfg, meta, full_state_dict(model)


def export_to_hf(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizers: str | os.PathLike | TokenizerFiles | None = None,
    weights_only: bool = False,
) -> Path:
    """Write the HF directory of an mmcap checkpoint (config, weights, generation config and
    processor); returns ``out``.

    Args:
        tokenizers: where the two tokenizers are when the checkpoint does not carry them: a
            dataset made by ``tools/preprocess_data.py``, a checkpoint, a tokenizer set
            (:mod:`mmcap.checkpoint.inference_assets`) or a :class:`TokenizerFiles`.
        weights_only: export without a processor (no tokenizers needed).

    Raises:
        CheckpointError: no tokenizers were found (and not ``weights_only``), naming where it
            looked and how to supply them: an export is complete or not written at all.
    """
    from transformers import GenerationConfig

    from mmcap.checkpoint import read_checkpoint_info, resolve_checkpoint_dir
    from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = resolve_checkpoint_dir(ckpt_dir)
    read_checkpoint_info(ckpt)  # "not an mmcap checkpoint" before anything else
    tok = None if weights_only else find_export_tokenizers(ckpt, tokenizers)
    model_cfg, meta, ours = load_full_checkpoint(ckpt)
    config = hf_config(model_cfg)
    processor = None if tok is None else build_processor(tok, model_cfg, config.image_token_id, ckpt)
    hf = MmcapCaptionerForConditionalGeneration(config).eval()
    tensors = hf_state_dict(model_cfg, ours)
    result = hf.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"export does not cover the HF model: missing "
            f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}"
        )
    hf.to(DTYPES[dtype])
    hf.generation_config = GenerationConfig(
        decoder_start_token_id=model_cfg.decoder.decoder_start_token_id,
        eos_token_id=model_cfg.decoder.eos_token_id,
        pad_token_id=model_cfg.decoder.pad_token_id,
        bos_token_id=model_cfg.decoder.bos_token_id,
        num_beams=4,
        max_new_tokens=128,
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
            shutil.copyfile(tok.decoder_model, tmp / "gemma_tokenizer.model")
            info = ckpt / INFERENCE_DIR / INFO_FILE
            if info.is_file():
                shutil.copyfile(info, tmp / "mmcap_inference.json")
    return Path(out)


def find_export_tokenizers(ckpt: Path, given=None) -> TokenizerFiles:
    """The tokenizers of an export: ``given`` (a path or TokenizerFiles), else those the
    checkpoint carries; a CheckpointError saying how to supply them when there are none."""
    if isinstance(given, TokenizerFiles):
        if not (given.encoder_dir.is_dir() and given.decoder_model.is_file()):
            raise CheckpointError(
                f"tokenizers from the {given.origin}: {given.encoder_dir} must be a tokenizer "
                f"directory and {given.decoder_model} a SentencePiece model file"
            )
        return given
    if given is not None:
        found = tokenizers_in(given)
        if found is None:
            raise CheckpointError(
                f"--tokenizers {given}: holds no tokenizers; expected a dataset made by "
                "tools/preprocess_data.py (tokenizers/), an mmcap checkpoint (inference/ or "
                "tokenizer/ + gemma/tokenizer.model), or a folder with encoder/ (the Florence-2 "
                "tokenizer files) and decoder/tokenizer.model (the Gemma SentencePiece model)"
            )
        return found
    found = tokenizers_in(ckpt)
    if found is None:
        raise CheckpointError(
            f"{ckpt} carries no tokenizers (no {INFERENCE_DIR}/ as training checkpoints store "
            "it, no tokenizer/ + gemma/tokenizer.model as tools/convert_from_hf.py stores them), "
            "so the export would have no processor and AutoProcessor could not load it. Pass "
            "--tokenizers DATASET_DIR (the data the model was trained on), or "
            "--encoder-tokenizer DIR --gemma-tokenizer FILE (the files given to "
            "tools/preprocess_data.py), or --weights-only to export the weights alone"
        )
    return found


def build_processor(tok: TokenizerFiles, model_cfg: ModelConfig, image_token_id: int, ckpt: Path):
    """The :class:`MmcapCaptionerProcessor` of an export: image processor at the model's image
    size, both tokenizers (checked against the model's vocabularies), the training crop."""
    import json

    from transformers import AutoTokenizer, GemmaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    from mmcap.hf.processing_mmcap import MmcapCaptionerProcessor, build_image_processor

    bart = AutoTokenizer.from_pretrained(tok.encoder_dir, local_files_only=True)
    vocab, _, merges = SentencePieceExtractor(str(tok.decoder_model)).extract()
    gemma = GemmaTokenizer(vocab=vocab, merges=merges)
    for name, n, limit, key in (
        ("encoder (BART)", len(bart), model_cfg.encoder.vocab_size, "encoder"),
        ("decoder (Gemma)", len(vocab), model_cfg.decoder.vocab_size, "decoder"),
    ):
        if n > limit:
            raise CheckpointError(
                f"{tok.origin}: the {name} tokenizer has {n} tokens but the model's {key} has "
                f"{limit}; these are not the tokenizers this model was trained with"
            )
    info_file = ckpt / INFERENCE_DIR / INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return MmcapCaptionerProcessor(
        build_image_processor(model_cfg.vision.image_size),
        bart,
        gemma,
        image_token_id=image_token_id,
        max_prompt_tokens=info.get("max_prompt_tokens"),
    )
