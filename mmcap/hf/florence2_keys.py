"""Declarative key table between Florence-2 checkpoints and mmcap's CaptioningModel
(the BART encoder and the BART decoder; the vision side is :mod:`mmcap.model.vision.hf_keys`).

Both Florence-2 layouts name the BART parts the same way below a prefix: transformers 5.x
native ``Florence2ForConditionalGeneration`` uses ``model.language_model.``, the original
remote-code layout ``language_model.model.``. q/k/v are fused into megatron-core's grouped
layouts (:mod:`mmcap.hf.fused`, MHA: one group per head); word tables are padded with zero rows
to mmcap's (TP-padded) row counts.
"""

from __future__ import annotations

import torch

from mmcap.config import ModelConfig
from mmcap.config.presets import FLORENCE_FINAL_LOGIT_SOFTCAP
from mmcap.hf.fused import fuse_kv, fuse_qkv, split_kv, split_qkv

LM_PREFIX = {"hf": "model.language_model.", "official": "language_model.model."}

# (mmcap suffix, checkpoint suffix) per layer, {p} = weight / bias.
ENCODER_LAYER = [
    ("self_attention.linear_proj.{p}", "self_attn.out_proj.{p}"),
    ("self_attn_layernorm.{p}", "self_attn_layer_norm.{p}"),
    ("mlp.linear_fc1.{p}", "fc1.{p}"),
    ("mlp.linear_fc2.{p}", "fc2.{p}"),
    ("final_layernorm.{p}", "final_layer_norm.{p}"),
]
DECODER_LAYER = ENCODER_LAYER + [
    ("cross_attention.linear_q.{p}", "encoder_attn.q_proj.{p}"),
    ("cross_attention.linear_proj.{p}", "encoder_attn.out_proj.{p}"),
    ("cross_attn_layernorm.{p}", "encoder_attn_layer_norm.{p}"),
]
STACK = [  # (mmcap suffix, checkpoint suffix) per stack
    ("embedding.position_embeddings.weight", "embed_positions.weight"),
    ("embedding.layernorm_embedding.{p}", "layernorm_embedding.{p}"),
]
QKV = (
    "self_attention.linear_qkv.{p}",
    ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
)
XKV = ("cross_attention.linear_kv.{p}", ("encoder_attn.k_proj.{p}", "encoder_attn.v_proj.{p}"))
PARAMS = ("weight", "bias")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"embedding has {t.shape[0]} rows, more than the model's {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _stacks(model: ModelConfig, with_decoder: bool):
    """(name, layers, heads, width, per-layer table, has cross-attention) per BART stack."""
    enc, dec = model.encoder, model.decoder
    out = [
        ("encoder", enc.num_layers, enc.num_attention_heads, enc.hidden_size, ENCODER_LAYER, False)
    ]
    if with_decoder:
        out.append(
            (
                "decoder",
                dec.num_layers,
                dec.num_attention_heads,
                dec.hidden_size,
                DECODER_LAYER,
                True,
            )
        )
    return out


def bart_from_hf(
    sd: dict[str, torch.Tensor],
    model: ModelConfig,
    layout: str = "hf",
    tensor_parallel: int = 1,
    with_decoder: bool = True,
) -> dict[str, torch.Tensor]:
    """mmcap ``encoder.*`` (and, ``with_decoder``, BART ``decoder.*``) tensors, full and
    TP-independent, from a Florence-2 state dict in ``layout`` ("hf" or "official").
    Embedding tables are zero-padded to the model's row counts."""
    pre = LM_PREFIX[layout]

    def get(name: str) -> torch.Tensor:
        if name not in sd:
            raise KeyError(f"Florence-2 checkpoint ({layout} layout) has no tensor {name!r}")
        return sd[name]

    out: dict[str, torch.Tensor] = {}
    for stack, layers, heads, width, table, cross in _stacks(model, with_decoder):
        src = f"{pre}{stack}."
        for ours, theirs in STACK:
            for p in PARAMS if "{p}" in ours else ("",):
                out[f"{stack}.{ours.format(p=p)}"] = get(src + theirs.format(p=p))
        for i in range(layers):
            a, b = f"{stack}.layers.{i}.", f"{src}layers.{i}."
            for p in PARAMS:
                for ours, theirs in table:
                    out[a + ours.format(p=p)] = get(b + theirs.format(p=p))
                q, k, v = (get(b + n.format(p=p)) for n in QKV[1])
                out[a + QKV[0].format(p=p)] = fuse_qkv(q, k, v, heads, heads, width // heads)
                if cross:
                    k, v = (get(b + n.format(p=p)) for n in XKV[1])
                    out[a + XKV[0].format(p=p)] = fuse_kv(k, v, heads, width // heads)
    out["encoder.embedding.word_embeddings.weight"] = _pad_rows(
        _first(sd, f"{pre}encoder.embed_tokens.weight", f"{pre}shared.weight"),
        model.encoder.embedding_rows(tensor_parallel),
    )
    if with_decoder:
        out["decoder.embedding.word_embeddings.weight"] = _pad_rows(
            _first(sd, f"{pre}decoder.embed_tokens.weight", f"{pre}shared.weight"),
            model.decoder.padded_vocab_size(tensor_parallel),
        )
    return out


def bart_to_hf(
    ours: dict[str, torch.Tensor], model: ModelConfig, layout: str = "hf", with_decoder: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`bart_from_hf` (embeddings cut back to the model's real row counts:
    the encoder's ``padded_vocab_size`` rows and the decoder's ``vocab_size`` rows)."""
    pre = LM_PREFIX[layout]
    out: dict[str, torch.Tensor] = {}
    for stack, layers, heads, width, table, cross in _stacks(model, with_decoder):
        dst = f"{pre}{stack}."
        for o, t in STACK:
            for p in PARAMS if "{p}" in o else ("",):
                out[dst + t.format(p=p)] = ours[f"{stack}.{o.format(p=p)}"]
        for i in range(layers):
            a, b = f"{stack}.layers.{i}.", f"{dst}layers.{i}."
            for p in PARAMS:
                for o, t in table:
                    out[b + t.format(p=p)] = ours[a + o.format(p=p)]
                qkv = split_qkv(ours[a + QKV[0].format(p=p)], heads, heads, width // heads)
                for n, tensor in zip(QKV[1], qkv):
                    out[b + n.format(p=p)] = tensor
                if cross:
                    kv = split_kv(ours[a + XKV[0].format(p=p)], heads, width // heads)
                    for n, tensor in zip(XKV[1], kv):
                        out[b + n.format(p=p)] = tensor
    out[f"{pre}encoder.embed_tokens.weight"] = ours["encoder.embedding.word_embeddings.weight"][
        : model.encoder.padded_vocab_size
    ]
    if with_decoder:
        out[f"{pre}decoder.embed_tokens.weight"] = ours["decoder.embedding.word_embeddings.weight"][
            : model.decoder.vocab_size
        ]
    return out


def _first(sd: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    for n in names:
        if n in sd:
            return sd[n]
    raise KeyError(f"Florence-2 checkpoint has none of {list(names)}")


def model_config_from_hf(
    hf_config,
    image_size: int = 768,
    name: str = "from-hf",
    final_logit_softcap: float | None = FLORENCE_FINAL_LOGIT_SOFTCAP,
    encoder_pad_token_id: int | None = None,
) -> ModelConfig:
    """mmcap ModelConfig (Florence sizes: BART decoder) from a transformers ``Florence2Config``.

    The native HF class shares one vocabulary between encoder and decoder, so both get the
    text config's ``vocab_size`` here (mmcap keeps two tables; conversion copies ``shared``
    into both).

    Args:
        final_logit_softcap: the decoder's final logit soft-cap; default 30, the paper's Florence
            sizes (official models/florence2.py). None reproduces transformers' native class.
        encoder_pad_token_id: the BART encoder's pad id when the text config's ``pad_token_id``
            is the decoder's (official layout: ``encoder_pad_token_id`` 1 vs Gemma pad 0);
            None = ``text_config.pad_token_id`` (one shared BART vocabulary).
    """
    from mmcap.config import DecoderConfig, EncoderConfig, VisionConfig

    v, t = hf_config.vision_config, hf_config.text_config
    vision = VisionConfig(
        embed_dim=tuple(v.embed_dim),
        depths=tuple(v.depths),
        num_heads=tuple(v.num_heads),
        num_groups=tuple(v.num_groups),
        patch_size=tuple(v.patch_size),
        patch_stride=tuple(v.patch_stride),
        patch_padding=tuple(v.patch_padding),
        patch_prenorm=tuple(v.patch_prenorm),
        window_size=v.window_size,
        mlp_ratio=v.mlp_ratio,
        qkv_bias=v.qkv_bias,
        drop_path_rate=v.drop_path_rate,
        projection_dim=v.projection_dim,
        image_size=image_size,
        max_position_embeddings=v.max_position_embeddings,
        max_temporal_embeddings=v.max_temporal_embeddings,
    )
    encoder = EncoderConfig(
        num_layers=t.encoder_layers,
        hidden_size=t.d_model,
        num_attention_heads=t.encoder_attention_heads,
        ffn_hidden_size=t.encoder_ffn_dim,
        vocab_size=t.vocab_size,
        padded_vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        activation=t.activation_function,
        dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        activation_dropout=t.activation_dropout,
        scale_embedding=t.scale_embedding,
        init_std=t.init_std,
        pad_token_id=t.pad_token_id if encoder_pad_token_id is None else encoder_pad_token_id,
    )
    heads = t.decoder_attention_heads
    decoder = DecoderConfig(
        arch="bart",
        num_layers=t.decoder_layers,
        hidden_size=t.d_model,
        ffn_hidden_size=t.decoder_ffn_dim,
        num_attention_heads=heads,
        num_kv_heads=heads,
        head_dim=t.d_model // heads,
        vocab_size=t.vocab_size,
        make_vocab_size_divisible_by=1,
        max_position_embeddings=t.max_position_embeddings,
        activation=t.activation_function,
        norm_eps=1e-5,
        attn_logit_softcap=None,
        final_logit_softcap=final_logit_softcap,
        sliding_window=None,
        gated_cross_attention=False,
        encoder_hidden_size=t.d_model,
        dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        activation_dropout=t.activation_dropout,
        scale_embedding=t.scale_embedding,
        init_std=t.init_std,
        query_pre_attn_scalar=float(t.d_model // heads),
        pad_token_id=t.pad_token_id,
        eos_token_id=t.eos_token_id,
        bos_token_id=t.bos_token_id,
        decoder_start_token_id=t.decoder_start_token_id,
    )
    return ModelConfig(name, vision, encoder, decoder)
