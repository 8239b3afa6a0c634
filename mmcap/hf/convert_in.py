"""Hugging Face / official checkpoints -> mmcap tensors (the library behind
``tools/convert_from_hf.py``).

Three sources, each returning a :class:`Converted` (a ModelConfig + full tensors under
CaptioningModel's global names):

- :func:`convert_florence_size`: a Florence-2 checkpoint (transformers-native or original
  remote-code layout) -> a Florence-size model whose decoder speaks the Gemma vocabulary
  (embedding / LM head remapped by the mean rule, :mod:`mmcap.hf.remap`).
- :func:`convert_gemma_size`: Florence-2 vision + projector + BART encoder, a Gemma-2 decoder
  from a Gemma-2 checkpoint, and NEW gated cross-attention (N(0, 0.02), gate 0, post-norm =
  that layer's post-attention norm).
- :func:`mmcap.hf.convert_official.import_official`: a checkpoint of the paper's official
  implementation (remote-code layout, all four sizes) with no remapping.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from mmcap.config import ModelConfig, get_preset
from mmcap.hf.florence2_keys import bart_from_hf, model_config_from_hf
from mmcap.hf.gemma2_keys import decoder_config_from_hf, gemma2_from_hf
from mmcap.hf.io import CheckpointError, read_config, read_state_dict
from mmcap.model.vision import vision_from_hf

# Tokenizer files copied next to a converted checkpoint (BART prompt tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
INIT_STD = 0.02  # new rows and new cross-attention (SYSTEM.md, official prepare.py)
EXTRA_DECODER_ROWS = 1024  # official constant: decoder table = Gemma vocab + 1,024
OFFICIAL_DECODER_PREFIX = "language_model.model.decoder."
# The remapped decoder speaks the Gemma vocabulary: its ids (SYSTEM.md "Token ids").
GEMMA_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "decoder_start_token_id": 1}
VISION_NAMESPACES = {
    "hf": ("model.vision_tower.", "model.multi_modal_projector."),
    "official": (
        "vision_tower.",
        "image_projection",
        "image_proj_norm.",
        "image_pos_embed.",
        "visual_temporal_embed.",
    ),
}


@dataclass
class Converted:
    model: ModelConfig
    tensors: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)


def florence_layout(sd: dict) -> str:
    if any(k.startswith("model.language_model.") for k in sd):
        return "hf"
    if any(k.startswith("language_model.model.") for k in sd):
        return "official"
    raise CheckpointError(
        "not a Florence-2 checkpoint: no model.language_model.* (transformers) "
        "or language_model.model.* (original remote-code) tensors"
    )


def _official_parts(cfg: dict):
    """transformers-style vision / text config objects from an original remote-code config."""
    from transformers import BartConfig, Florence2VisionConfig

    v, t = dict(cfg["vision_config"]), dict(cfg["text_config"])
    vision = Florence2VisionConfig(
        embed_dim=v.get("dim_embed", v.get("embed_dim")),
        depths=v["depths"],
        num_heads=v["num_heads"],
        num_groups=v["num_groups"],
        patch_size=v["patch_size"],
        patch_stride=v["patch_stride"],
        patch_padding=v["patch_padding"],
        patch_prenorm=v["patch_prenorm"],
        window_size=v["window_size"],
        projection_dim=v["projection_dim"],
        drop_path_rate=v.get("drop_path_rate", 0.1),
        max_position_embeddings=v.get("image_pos_embed", {}).get("max_pos_embeddings", 50),
        max_temporal_embeddings=v.get("visual_temporal_embedding", {}).get(
            "max_temporal_embeddings", 100
        ),
    )
    bart_keys = set(BartConfig().to_dict())
    text = BartConfig(**{k: val for k, val in t.items() if k in bart_keys and k != "model_type"})
    text.vocab_size = t.get("encoder_vocab_size", t.get("vocab_size"))
    return vision, text, t.get("gemma_config"), t


def _florence_arch(cfg: dict, layout: str, image_size: int) -> ModelConfig:
    """The checkpoint's own architecture (BART decoder, its own vocabulary)."""
    if layout == "hf":
        from transformers import Florence2Config

        return model_config_from_hf(Florence2Config(**cfg), image_size=image_size)
    return official_arch(cfg, image_size)


def official_arch(cfg: dict, image_size: int) -> ModelConfig:
    """The BART architecture of an original remote-code config. Its text_config ids
    (``pad_token_id`` ...) are the decoder's; the encoder's pad is ``encoder_pad_token_id``
    (1, BART ``<pad>``; absent in Microsoft's Florence-2 configs, whose ids are BART's)."""
    vision, text, _, raw = _official_parts(cfg)
    return model_config_from_hf(
        SimpleNamespace(vision_config=vision, text_config=text),
        image_size=image_size,
        encoder_pad_token_id=raw.get("encoder_pad_token_id"),
    )


# Fields _check_preset compares (position tables included: a preset whose table has another
# row count would otherwise pass the check and die later in a shape error).
PRESET_FIELDS = {
    "vision": ("embed_dim", "depths", "num_heads", "projection_dim"),
    "encoder": (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "max_position_embeddings",
    ),
    "decoder": (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_kv_heads",
        "ffn_hidden_size",
        "head_dim",
        "max_position_embeddings",
    ),
}
# The official layout also fixes both vocabularies (no remapping on import).
OFFICIAL_PRESET_FIELDS = {
    "encoder": PRESET_FIELDS["encoder"] + ("padded_vocab_size",),
    "decoder": PRESET_FIELDS["decoder"] + ("vocab_size", "final_logit_softcap"),
}


def _check_preset(
    preset: ModelConfig, arch: ModelConfig, parts=("vision", "encoder"), fields=None
) -> None:
    """Raise naming the first field where ``preset`` and the checkpoint disagree."""
    fields = {**PRESET_FIELDS, **(fields or {})}

    def norm(x):
        return tuple(x) if isinstance(x, (list, tuple)) else x

    for part in parts:
        for f in fields[part]:
            a, b = getattr(getattr(preset, part), f), getattr(getattr(arch, part), f)
            if norm(a) != norm(b):
                raise CheckpointError(
                    f"preset {preset.name!r} does not fit the checkpoint: "
                    f"{part}.{f} is {a} in the preset, {b} in the checkpoint"
                )


def _vision_and_encoder(sd, layout, model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    out = {f"vision.{k}": v for k, v in vision_from_hf(sd, layout).items()}
    enc = bart_from_hf(sd, model, layout, with_decoder=False)
    # Encoder rows beyond the checkpoint's (51,289 -> 51,328 for the Florence sizes) start from
    # N(0, 0.02) like every new row, not zeros.
    src = _first(sd, layout, "encoder.embed_tokens.weight", "shared.weight")
    table = enc["encoder.embedding.word_embeddings.weight"]
    g = torch.Generator().manual_seed(seed)
    table[src.shape[0] :] = (
        torch.randn(table.shape[0] - src.shape[0], table.shape[1], generator=g).to(table.dtype)
        * INIT_STD
    )
    out.update(enc)
    return out


def _first(sd, layout, *names):
    pre = {"hf": "model.language_model.", "official": "language_model.model."}[layout]
    for n in names:
        if pre + n in sd:
            return sd[pre + n]
    raise CheckpointError(f"checkpoint has none of {[pre + n for n in names]}")


def convert_florence_size(
    florence_dir: str | os.PathLike,
    gemma_tokenizer: str | os.PathLike,
    preset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 768,
    seed: int = 0,
) -> Converted:
    """Florence-2 checkpoint -> Florence-size mmcap model with the Gemma decoder vocabulary."""
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer
    from mmcap.hf.remap import load_or_build_token_map, remap_decoder_embedding

    cfg, sd = read_config(florence_dir), read_state_dict(florence_dir)
    layout = florence_layout(sd)
    arch = _florence_arch(cfg, layout, image_size)
    gemma, bart = TargetTokenizer(gemma_tokenizer), PromptTokenizer(florence_dir)
    rows = gemma.vocab_size + EXTRA_DECODER_ROWS
    if preset:
        model = get_preset(preset)
        _check_preset(model, arch, ("vision", "encoder", "decoder"))
        if model.decoder.vocab_size < rows:
            raise CheckpointError(
                f"preset {preset!r} has {model.decoder.vocab_size} decoder rows; "
                f"the Gemma tokenizer needs {rows}"
            )
        model = dataclasses.replace(
            model, vision=dataclasses.replace(model.vision, image_size=image_size)
        )
    else:
        model = dataclasses.replace(
            arch,
            name="custom-florence",
            decoder=dataclasses.replace(
                arch.decoder, vocab_size=rows, make_vocab_size_divisible_by=128, **GEMMA_IDS
            ),
        )
    out = _vision_and_encoder(sd, layout, model, seed)
    dec = bart_from_hf(sd, dataclasses.replace(model, encoder=arch.encoder), layout)
    out.update({k: v for k, v in dec.items() if k.startswith("decoder.")})
    tm, cached = load_or_build_token_map(gemma, bart, cache_dir or Path(florence_dir))
    bart_rows = _first(sd, layout, "decoder.embed_tokens.weight", "shared.weight")
    table, rep = remap_decoder_embedding(
        bart_rows, tm, gemma, bart, model.decoder.vocab_size, seed=seed + 1
    )
    out["decoder.embedding.word_embeddings.weight"] = torch.cat(
        [
            table,
            table.new_zeros(model.decoder.padded_vocab_size(1) - table.shape[0], table.shape[1]),
        ]
    )
    report = {
        "layout": layout,
        "token_map_cached": cached,
        "mean_rows": rep.mean_rows,
        "special_rows": rep.special_rows,
        "zero_token_pieces": len(rep.zero_token_pieces),
        "zero_token_piece_ids": rep.zero_token_pieces[:50],
        "init_rows": rep.init_rows,
        "gemma_tokenizer_sha256": gemma.content_hash,
        "bart_tokenizer_sha256": bart.content_hash,
    }
    return Converted(model, out, report)


def convert_gemma_size(
    florence_dir: str | os.PathLike,
    gemma_dir: str | os.PathLike,
    preset: str | None = None,
    image_size: int = 768,
    seed: int = 0,
) -> Converted:
    """Florence-2 vision + encoder, Gemma-2 decoder, new gated cross-attention."""
    from transformers import Gemma2Config

    cfg, sd = read_config(florence_dir), read_state_dict(florence_dir)
    layout = florence_layout(sd)
    arch = _florence_arch(cfg, layout, image_size)
    gcfg = read_config(gemma_dir)
    if gcfg.get("model_type") != "gemma2":
        raise CheckpointError(
            f"{Path(gemma_dir) / 'config.json'}: model_type is "
            f"{gcfg.get('model_type')!r}, expected 'gemma2'"
        )
    decoder = decoder_config_from_hf(
        Gemma2Config(**gcfg), encoder_hidden_size=arch.encoder.hidden_size
    )
    enc_rows = _first(sd, layout, "encoder.embed_tokens.weight", "shared.weight").shape[0]
    encoder = dataclasses.replace(arch.encoder, padded_vocab_size=enc_rows)
    model = ModelConfig("custom-gemma", arch.vision, encoder, decoder)
    if preset:
        pre = get_preset(preset)
        _check_preset(pre, model, ("vision", "encoder", "decoder"))
        model = dataclasses.replace(
            pre, vision=dataclasses.replace(pre.vision, image_size=image_size)
        )
    out = _vision_and_encoder(sd, layout, model, seed)
    gsd = read_state_dict(gemma_dir)
    dec = gemma2_from_hf(gsd, model.decoder, model.decoder.padded_vocab_size(1))
    out.update({f"decoder.{k}": v for k, v in dec.items()})
    out.update(new_cross_attention(model, seed + 2))
    return Converted(model, out, {"layout": layout, "gemma_dir": str(gemma_dir)})


def new_cross_attention(model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """q / kv / o ~ N(0, 0.02) and gate 0 for every layer (post-norms come with the decoder)."""
    d = model.decoder
    g = torch.Generator().manual_seed(seed)
    q, kv = d.num_attention_heads * d.head_dim, d.num_kv_heads * d.head_dim
    out = {}
    for i in range(d.num_layers):
        p = f"decoder.layers.{i}.cross_attention."
        out[p + "linear_q.weight"] = torch.randn(q, d.hidden_size, generator=g) * INIT_STD
        out[p + "linear_kv.weight"] = (
            torch.randn(2 * kv, d.encoder_hidden_size, generator=g) * INIT_STD
        )
        out[p + "linear_proj.weight"] = torch.randn(d.hidden_size, q, generator=g) * INIT_STD
        out[p + "gate"] = torch.zeros(1)
    return out


def write_checkpoint(
    conv: Converted,
    out: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    extra_files: dict | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``conv`` as a megatron-core distributed checkpoint at ``out`` (atomic).

    The checkpoint is layout-independent (loads with any TP/PP); ``tensor_parallel`` /
    ``pipeline_parallel`` are validated against the model and recorded as the intended layout.
    Every parameter of the model must be provided by the conversion.
    """
    from mmcap.checkpoint import save_model_checkpoint
    from mmcap.config import ParallelConfig, PrecisionConfig, validate_layout
    from mmcap.model.captioner import CaptioningModel
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import load_full_state_dict

    validate_layout(
        conv.model,
        ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel),
    )
    initialize_model_parallel(ParallelConfig(), seed=0)
    # Weights only move here: the local layers (same parameter names as TE's) on the CPU.
    local = PrecisionConfig("fp32", transformer_impl="local")
    model = CaptioningModel(conv.model, precision=local)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(conv.tensors))
    unexpected = sorted(set(conv.tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"conversion does not cover the model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    load_full_state_dict(model, conv.tensors)
    meta = {
        "intended_layout": {"tp": tensor_parallel, "pp": pipeline_parallel},
        **conv.report,
        **(metadata or {}),
    }
    return save_model_checkpoint(
        model, out, conv.model, meta, overwrite=overwrite, extra_files=extra_files
    )
