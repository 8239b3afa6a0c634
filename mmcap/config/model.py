"""Typed configuration of the model: vision tower, encoder, decoder, and the whole model.

One dataclass per component (STYLE.md 3); each validates itself in ``__post_init__`` and
raises :class:`ConfigError` naming the field and the fix. Shapes of the named presets live
in :mod:`mmcap.config.presets`; the facts behind them are in ``shared/design/SYSTEM.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from mmcap.config.errors import ConfigError, require  # noqa: F401 - ConfigError re-exported


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(
            isinstance(v, int) and v > 0,
            f"{type(obj).__name__}.{n}",
            f"must be a positive integer, got {v!r}",
        )


@dataclass
class VisionConfig:
    """Florence-2 DaViT vision tower + image projection (transformers' Florence2VisionConfig names).

    Args:
        embed_dim / depths / num_heads / num_groups: per-stage width, blocks, spatial-attention
            heads and channel-attention groups.
        patch_size / patch_stride / patch_padding / patch_prenorm: the conv embedding of each stage.
        window_size: spatial window attention size.
        projection_dim: width of the image tokens handed to the encoder (= encoder d_model).
        image_size: square input resolution (224 pretraining, 768 fine-tuning).
        max_position_embeddings: rows/cols of the learned 2D position embedding.
        max_temporal_embeddings: length of the 1D temporal cosine embedding.
    """

    embed_dim: tuple[int, ...] = (128, 256, 512, 1024)
    depths: tuple[int, ...] = (1, 1, 9, 1)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    num_groups: tuple[int, ...] = (4, 8, 16, 32)
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    in_channels: int = 3
    projection_dim: int = 768
    image_size: int = 224
    max_position_embeddings: int = 50
    max_temporal_embeddings: int = 100

    def __post_init__(self) -> None:
        n = len(self.embed_dim)
        for name in (
            "depths",
            "num_heads",
            "num_groups",
            "patch_size",
            "patch_stride",
            "patch_padding",
            "patch_prenorm",
        ):
            require(
                len(getattr(self, name)) == n,
                f"VisionConfig.{name}",
                f"needs one entry per stage ({n} stages from embed_dim), got "
                f"{len(getattr(self, name))}",
            )
        for i, (d, h, g) in enumerate(zip(self.embed_dim, self.num_heads, self.num_groups)):
            require(
                d % h == 0,
                "VisionConfig.num_heads",
                f"stage {i}: embed_dim {d} is not divisible by num_heads {h}",
            )
            require(
                d % g == 0,
                "VisionConfig.num_groups",
                f"stage {i}: embed_dim {d} is not divisible by num_groups {g}",
            )
        _positive(self, "window_size", "projection_dim", "image_size")
        total_stride = 1
        for s in self.patch_stride:
            total_stride *= s
        require(
            self.image_size % total_stride == 0,
            "VisionConfig.image_size",
            f"must be a multiple of the total patch stride {total_stride}",
        )

    @property
    def grid_size(self) -> int:
        """Side of the final feature grid (224 px -> 7, 768 px -> 24)."""
        total_stride = 1
        for s in self.patch_stride:
            total_stride *= s
        return self.image_size // total_stride

    @property
    def num_image_tokens(self) -> int:
        """1 pooled token + grid x grid tokens (224 px -> 50, 768 px -> 577)."""
        return 1 + self.grid_size**2


@dataclass
class EncoderConfig:
    """Florence-2 BART encoder over [image tokens ; prompt tokens].

    Args:
        vocab_size: BART tokenizer size (51,289); padded to ``padded_vocab_size`` rows.
        padded_vocab_size: embedding rows (51,328 for the Florence sizes, 51,289 for Gemma sizes).
    """

    num_layers: int = 6
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int = 3072
    vocab_size: int = 51289
    padded_vocab_size: int = 51328
    max_position_embeddings: int = 1024
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    scale_embedding: bool = False
    init_std: float = 0.02
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        _positive(
            self,
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "padded_vocab_size",
            "max_position_embeddings",
        )
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "EncoderConfig.num_attention_heads",
            f"hidden_size {self.hidden_size} must be divisible by it ({self.num_attention_heads})",
        )
        require(
            self.padded_vocab_size >= self.vocab_size,
            "EncoderConfig.padded_vocab_size",
            f"must be >= vocab_size {self.vocab_size}",
        )

    def embedding_rows(self, tensor_parallel_size: int = 1) -> int:
        """Rows of the (vocab-parallel) embedding: padded_vocab_size rounded up to a multiple
        of TP. Extra rows are never looked up (the encoder has no LM head)."""
        tp = tensor_parallel_size
        return ((self.padded_vocab_size + tp - 1) // tp) * tp


DecoderArch = Literal["gemma2", "bart"]


@dataclass
class DecoderConfig:
    """Text decoder: Gemma-2 with gated cross-attention (``arch="gemma2"``) or BART (``"bart"``).

    Gemma-2 facts (SYSTEM.md): RMSNorm(1 + w), sandwich norms, GeGLU (tanh GELU), RoPE, GQA,
    scale ``query_pre_attn_scalar ** -0.5``, soft-caps 50 (attention) / 30 (final logits),
    sliding window on HF's ``sliding_attention`` layers, embeddings scaled by sqrt(hidden),
    tied embedding / LM head, and a gated cross-attention block in every layer.

    Args:
        layer_types: per-layer "sliding_attention" / "full_attention" in HF's numbering; None =
            HF Gemma2's default (layer i slides iff i is even: ``bool((i + 1) % 2)``).
        gated_cross_attention: insert the gated cross-attention block in every layer (Gemma sizes).
        encoder_hidden_size: width of the encoder output the cross-attention reads (1024).
        make_vocab_size_divisible_by: vocab padding unit (x TP), as Megatron-LM.
    """

    arch: DecoderArch = "gemma2"
    num_layers: int = 26
    hidden_size: int = 2304
    ffn_hidden_size: int = 9216
    num_attention_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 256000
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    activation: str = "gelu_tanh"
    tie_word_embeddings: bool = True
    gated_cross_attention: bool = True
    encoder_hidden_size: int = 1024
    xattn_init_std: float = 0.02
    init_std: float = 0.02
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    decoder_start_token_id: int = 1

    def __post_init__(self) -> None:
        require(
            self.arch in ("gemma2", "bart"),
            "DecoderConfig.arch",
            f"must be 'gemma2' or 'bart', got {self.arch!r}",
        )
        _positive(
            self,
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "make_vocab_size_divisible_by",
        )
        require(
            self.num_attention_heads % self.num_kv_heads == 0,
            "DecoderConfig.num_kv_heads",
            f"num_attention_heads {self.num_attention_heads} must be a multiple of "
            f"num_kv_heads {self.num_kv_heads} (GQA groups)",
        )
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            require(
                len(self.layer_types) == self.num_layers,
                "DecoderConfig.layer_types",
                f"needs {self.num_layers} entries (one per layer), got "
                f"{len(self.layer_types)}; or leave it None for HF's alternation",
            )
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            require(
                not bad,
                "DecoderConfig.layer_types",
                f"entries must be 'sliding_attention' or 'full_attention', got {bad}",
            )
        if self.arch == "gemma2" and "sliding_attention" in self.resolved_layer_types:
            require(
                self.sliding_window is not None and self.sliding_window > 0,
                "DecoderConfig.sliding_window",
                "must be a positive integer when any layer is 'sliding_attention'",
            )
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            v = getattr(self, name)
            require(v is None or v > 0, f"DecoderConfig.{name}", f"must be None or > 0, got {v}")
        require(
            self.query_pre_attn_scalar > 0, "DecoderConfig.query_pre_attn_scalar", "must be > 0"
        )
        if self.gated_cross_attention or self.arch == "bart":
            _positive(self, "encoder_hidden_size")
        if self.arch == "bart":
            require(
                self.num_attention_heads * self.head_dim == self.hidden_size,
                "DecoderConfig.head_dim",
                f"BART needs num_attention_heads x head_dim == hidden_size "
                f"({self.num_attention_heads} x {self.head_dim} != {self.hidden_size})",
            )
            require(
                self.num_kv_heads == self.num_attention_heads,
                "DecoderConfig.num_kv_heads",
                "BART has no GQA: set num_kv_heads = num_attention_heads",
            )

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        """``layer_types``, or HF Gemma2Config's default: layer i (0-based) slides iff i is even
        (``"sliding_attention" if bool((i + 1) % 2) else "full_attention"``)."""
        if self.layer_types is not None:
            return self.layer_types
        return tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_layers)
        )

    def is_sliding(self, layer_idx: int) -> bool:
        """Whether global layer ``layer_idx`` (0-based, HF numbering) uses the sliding window."""
        return self.resolved_layer_types[layer_idx] == "sliding_attention"

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocab rows after padding to a multiple of make_vocab_size_divisible_by x TP."""
        unit = self.make_vocab_size_divisible_by * tensor_parallel_size
        return ((self.vocab_size + unit - 1) // unit) * unit


@dataclass
class TrainableConfig:
    """What trains (SYSTEM.md "What trains"); defaults are the paper's.

    Args:
        vision: the DaViT tower, projection, position embeddings and projection norm (frozen in
            the paper: keep False).
        encoder: the BART encoder (trainable in the paper).
        decoder: "all" (Florence sizes) or "cross_attention" (Gemma sizes: only the gated
            cross-attention blocks, their gates and post-norms, and the tied embedding / LM
            head train); None picks the paper's choice for the decoder architecture.
    """

    vision: bool = False
    encoder: bool = True
    decoder: Literal["all", "cross_attention"] | None = None

    def __post_init__(self) -> None:
        require(
            self.decoder in (None, "all", "cross_attention"),
            "TrainableConfig.decoder",
            f"must be None, 'all' or 'cross_attention', got {self.decoder!r}",
        )

    def decoder_policy(self, arch: str) -> str:
        if self.decoder is not None:
            return self.decoder
        return "cross_attention" if arch == "gemma2" else "all"


@dataclass
class ModelConfig:
    """The whole captioning model: vision tower + BART encoder + decoder.

    Args:
        vision_train_mode: keep the FROZEN vision tower in train mode whenever the model trains,
            so its drop-path (``VisionConfig.drop_path_rate``, 0.1) is active on frozen weights,
            as in the official implementation (the HF Trainer's ``model.train()`` reaches the
            frozen DaViT). Still no gradients and no autograd graph. Default False (mmcap): the
            frozen tower always runs in eval mode, deterministic and equal to cached features.
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    vision_train_mode: bool = False

    def __post_init__(self) -> None:
        require(
            isinstance(self.vision_train_mode, bool),
            "ModelConfig.vision_train_mode",
            f"must be true or false, got {self.vision_train_mode!r}",
        )
        require(
            not (self.vision_train_mode and self.trainable.vision),
            "ModelConfig.vision_train_mode",
            "applies to a frozen vision tower only; a trainable one (trainable.vision=true) "
            "follows the model's mode anyway: leave vision_train_mode false",
        )
        require(
            self.vision.projection_dim == self.encoder.hidden_size,
            "VisionConfig.projection_dim",
            f"image tokens ({self.vision.projection_dim}) must have the encoder width "
            f"({self.encoder.hidden_size})",
        )
        if self.trainable.decoder_policy(self.decoder.arch) == "cross_attention":
            require(
                self.decoder.gated_cross_attention,
                "TrainableConfig.decoder",
                "'cross_attention' needs a decoder with gated cross-attention (Gemma sizes)",
            )
        if self.decoder.arch == "bart" or self.decoder.gated_cross_attention:
            require(
                self.decoder.encoder_hidden_size == self.encoder.hidden_size,
                "DecoderConfig.encoder_hidden_size",
                f"must equal the encoder width {self.encoder.hidden_size}, got "
                f"{self.decoder.encoder_hidden_size}",
            )


def replace(cfg, **changes):
    """``dataclasses.replace`` that re-runs validation (a typed override)."""
    return dataclasses.replace(cfg, **changes)
