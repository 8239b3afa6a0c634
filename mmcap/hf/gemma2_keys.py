"""Declarative key table between transformers' Gemma2ForCausalLM and mmcap's Gemma2Decoder.

One table serves both directions (STYLE.md 7). mmcap names use GLOBAL layer indices here;
:func:`stage_state_dict` renames them to a pipeline stage's local ``layers.{i}``. Fused mmcap
tensors are built from several HF tensors:

- ``linear_qkv``: megatron-core's grouped layout, per kv group g: [q heads of g ; k_g ; v_g];
- ``linear_fc1``: [gate_proj ; up_proj] (TP shards with partition_stride 2);
- ``cross_attention.linear_kv``: per kv group g: [k_g ; v_g].
The embedding is padded with zero rows to the TP-padded vocabulary (those logits are masked).
"""

from __future__ import annotations

import re

import torch

from mmcap.config import DecoderConfig
from mmcap.hf.fused import fuse_kv, fuse_qkv, split_kv, split_qkv

# (mmcap name, checkpoint name below the decoder prefix); {i} = global layer index.
# Gemma2ForCausalLM's decoder prefix is "model."; mmcap's HF classes use
# "model.language_model.decoder." and the paper's official layout "language_model.model.decoder.".
GEMMA2_PREFIX = "model."
LAYER_COPY = [
    ("layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.pre_mlp_layernorm.weight", "layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.post_mlp_layernorm.weight", "layers.{i}.post_feedforward_layernorm.weight"),
    ("layers.{i}.self_attention.linear_proj.weight", "layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp.linear_fc2.weight", "layers.{i}.mlp.down_proj.weight"),
]
GLOBAL_COPY = [("final_layernorm.weight", "norm.weight")]
EMBEDDING = ("embedding.word_embeddings.weight", "embed_tokens.weight")
QKV = (
    "layers.{i}.self_attention.linear_qkv.weight",
    (
        "layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.self_attn.v_proj.weight",
    ),
)
FC1 = (
    "layers.{i}.mlp.linear_fc1.weight",
    ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
)
# The gated cross-attention block (mmcap's HF classes and the official layout).
XATTN_COPY = [
    ("layers.{i}.cross_attention.linear_q.weight", "layers.{i}.encoder_attn.q_proj.weight"),
    ("layers.{i}.cross_attention.linear_proj.weight", "layers.{i}.encoder_attn.o_proj.weight"),
    ("layers.{i}.cross_attention.gate", "layers.{i}.encoder_attn_gate"),
    (
        "layers.{i}.cross_attention.post_norm.weight",
        "layers.{i}.post_encoder_attention_layernorm.weight",
    ),
]
XATTN_KV = (
    "layers.{i}.cross_attention.linear_kv.weight",
    ("layers.{i}.encoder_attn.k_proj.weight", "layers.{i}.encoder_attn.v_proj.weight"),
)


def gemma2_from_hf(
    hf: dict[str, torch.Tensor],
    decoder: DecoderConfig,
    padded_vocab_size: int,
    prefix: str = GEMMA2_PREFIX,
    with_xattn: bool = False,
) -> dict[str, torch.Tensor]:
    """Full (TP-independent, global-layer) mmcap decoder tensors from a checkpoint.

    Args:
        hf: the checkpoint's tensors.
        prefix: where the decoder lives in it (Gemma2ForCausalLM: "model.").
        with_xattn: read the cross-attention block too. Without it (a plain Gemma-2), no
            cross-attention projections or gates are produced and each layer's
            ``cross_attention.post_norm`` starts as a copy of its post-attention norm
            (SYSTEM.md).
    """

    def get(name: str) -> torch.Tensor:
        if prefix + name not in hf:
            raise KeyError(f"checkpoint has no tensor {prefix + name!r}")
        return hf[prefix + name]

    out: dict[str, torch.Tensor] = {}
    emb = get(EMBEDDING[1])
    if emb.shape != (decoder.vocab_size, decoder.hidden_size):
        raise ValueError(
            f"{prefix}{EMBEDDING[1]}: shape {tuple(emb.shape)}, the config expects "
            f"({decoder.vocab_size}, {decoder.hidden_size})"
        )
    out[EMBEDDING[0]] = torch.cat(
        [emb, emb.new_zeros(padded_vocab_size - emb.shape[0], emb.shape[1])]
    )
    for ours, theirs in GLOBAL_COPY:
        out[ours] = get(theirs)
    h, kv, d = decoder.num_attention_heads, decoder.num_kv_heads, decoder.head_dim
    for i in range(decoder.num_layers):
        for ours, theirs in LAYER_COPY:
            out[ours.format(i=i)] = get(theirs.format(i=i))
        q, k, v = (get(n.format(i=i)) for n in QKV[1])
        out[QKV[0].format(i=i)] = fuse_qkv(q, k, v, h, kv, d)
        out[FC1[0].format(i=i)] = torch.cat([get(n.format(i=i)) for n in FC1[1]])
        if with_xattn:
            for ours, theirs in XATTN_COPY:
                out[ours.format(i=i)] = get(theirs.format(i=i))
            k, v = (get(n.format(i=i)) for n in XATTN_KV[1])
            out[XATTN_KV[0].format(i=i)] = fuse_kv(k, v, kv, d)
        elif decoder.gated_cross_attention:
            out[f"layers.{i}.cross_attention.post_norm.weight"] = out[
                f"layers.{i}.post_attention_layernorm.weight"
            ].clone()
    return out


def gemma2_to_hf(
    ours: dict[str, torch.Tensor],
    decoder: DecoderConfig,
    prefix: str = GEMMA2_PREFIX,
    with_xattn: bool = False,
    lm_head: str | None = "lm_head.weight",
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gemma2_from_hf` (embedding cut to the vocabulary; tied ``lm_head``)."""
    out = {prefix + EMBEDDING[1]: ours[EMBEDDING[0]][: decoder.vocab_size].clone()}
    for o, t in GLOBAL_COPY:
        out[prefix + t] = ours[o]
    h, kv, d = decoder.num_attention_heads, decoder.num_kv_heads, decoder.head_dim
    for i in range(decoder.num_layers):
        for o, t in LAYER_COPY:
            out[prefix + t.format(i=i)] = ours[o.format(i=i)]
        for name, t in zip(QKV[1], split_qkv(ours[QKV[0].format(i=i)], h, kv, d)):
            out[prefix + name.format(i=i)] = t
        gate, up = ours[FC1[0].format(i=i)].chunk(2)
        out[prefix + FC1[1][0].format(i=i)] = gate.clone()
        out[prefix + FC1[1][1].format(i=i)] = up.clone()
        if with_xattn:
            for o, t in XATTN_COPY:
                out[prefix + t.format(i=i)] = ours[o.format(i=i)]
            for name, t in zip(XATTN_KV[1], split_kv(ours[XATTN_KV[0].format(i=i)], kv, d)):
                out[prefix + name.format(i=i)] = t
    if lm_head:
        out[lm_head] = out[prefix + EMBEDDING[1]]
    return out


_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def stage_state_dict(
    full: dict[str, torch.Tensor],
    layer_range: tuple[int, int],
    pre_process: bool,
    post_process: bool,
) -> dict[str, torch.Tensor]:
    """Select a pipeline stage's tensors from global-layer names and renumber its layers.

    The last stage of a tied model gets the embedding as ``output_layer.weight``.
    """
    start, end = layer_range
    out: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            if start <= i < end:
                out[f"layers.{i - start}.{m.group(2)}"] = t
        elif name == EMBEDDING[0]:
            if pre_process:
                out[name] = t
            elif post_process:
                out["output_layer.weight"] = t
        elif post_process:
            out[name] = t
    return out


def decoder_config_from_hf(
    hf_config, encoder_hidden_size: int = 1024, gated_cross_attention: bool = True
) -> DecoderConfig:
    """mmcap DecoderConfig from a transformers ``Gemma2Config`` (any size, tiny test ones too)."""
    layer_types = getattr(hf_config, "layer_types", None)
    return DecoderConfig(
        arch="gemma2",
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=float(_rope_theta(hf_config)),
        norm_eps=hf_config.rms_norm_eps,
        query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
        attn_logit_softcap=hf_config.attn_logit_softcapping,
        final_logit_softcap=hf_config.final_logit_softcapping,
        sliding_window=hf_config.sliding_window,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        gated_cross_attention=gated_cross_attention,
        encoder_hidden_size=encoder_hidden_size,
        pad_token_id=hf_config.pad_token_id,
        eos_token_id=_first(hf_config.eos_token_id),
        bos_token_id=hf_config.bos_token_id,
    )


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def _rope_theta(hf_config) -> float:
    # transformers 5.x keeps it in rope_parameters; 4.x had a rope_theta attribute.
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return getattr(hf_config, "rope_theta", 10000.0)
