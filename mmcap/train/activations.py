"""Saved activations of mmcap's layers per micro-batch: the activation part of the memory
estimate (:mod:`mmcap.train.memory`).

Activations (bytes, bf16 = 2, per micro-batch, after Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models": 34 sbh + 5 a s^2 b per layer, there
for a trainable GPT layer with LayerNorm and dropout), re-derived from what mmcap's layers
save for backward, on the fused-op path (``csrc/`` kernels on GPUs; the tests measure it on CPU
with ``MMCAP_FUSED_OPS_ON_CPU=1``, the custom ops with their torch math; the plain-autograd
references CPU runs by default save more: fp32 logits tiles, RMSNorm / GELU temporaries).
Per token, ``R`` terms are replicated over the TP group (divided by TP with sequence
parallelism), ``S`` terms are TP-sharded (divided by TP). A frozen linear (megatron-core
``linear_with_frozen_weight``) saves no input; a trainable one saves its bf16 input. Gemma's
fused RMSNorm saves its bf16 input and an fp32 rstd per token (2 h + 4); the fused GeGLU its
[gate ; up] input only. q = heads x head_dim, kv = kv_heads x head_dim, f = FFN width,
nh = heads, T = 1 where the block's weights train:

- attention core, memory-efficient kernel (flash / TE / flex): Q, K, V, O + fp32
  log-sum-exp (4 nh); no s^2 term. The ``math`` back-end adds, per score, 2 (bf16
  probabilities) + 4 (fp32 softmax) + 2 with soft-cap + 3 with dropout (mask + output):
  the 5 a s^2 b term.
- Gemma-2 layer (self-attn + gated cross-attn + GeGLU, 5 norms), per decoder token:
  R = 5 (2h + 4) (4 sandwich norms + xattn post-norm) + 2T (qkv in) + 2T (fc1 in) + 2 (xattn
  q in) + 2 (gate product); S = 2(q + 2kv) (fused qkv, alive through the v view) + 2q + 2kv
  (rotated q, k) + 2q (O) + 2Tq (proj in) + 4nh + 6q + 4nh (xattn Q, O, proj in) + 4f (fc1
  out = GeGLU input) + 2Tf (fc2 in); plus 4 kv per ENCODER token (the cross-attn K, V).
  For the Gemma sizes (T = 0): R = 14 h + 20, S = 12q + 6kv + 4f + 8nh.
- BART layer (post-LN, biases; dropout p > 0 keeps 1-byte masks on CUDA, 2 B on CPU), per
  token: self-attention R = 2T + 1 (dropout mask) + 2 (LN in), S = 6h (fused qkv: q, k, v
  are views) + 2h (O) + 2Th + 4nh; MLP R = 2T + 1 + 2,
  S = 2f (GELU in) + f (activation-dropout mask) + 2Tf; the decoder's cross-attention adds
  R = 2T + 1 + 2, S = 2h (Q) + 2h (O) + 2Th + 4nh and 4h per encoder token. A trainable
  encoder layer at f = 4h, TP = 1: 40 h (+ 4 nh) per token = Korthikanti's 34 + 2 (O, kept
  by the kernel besides the projection's input copy) + 4 (BART's activation-dropout mask).
- embeddings: BART LN (2) + dropout mask (1) R per token; Gemma's scaled embedding nothing.
- per stage and micro-batch: the encoder output [s_enc, b, 1024] that every cross-attention
  ``linear_kv`` saves (one tensor shared by the stage's layers; later stages unpack a copy);
  Gemma stages also keep the RoPE cos / sin tables (2 x 2 B x head_dim per token).
- head (last stage): final norm (2h + 4, R) and the fused LM-head loss (``logits`` in the
  breakdown; no logits are kept): its input hidden states on every TP rank (2h, not divided
  under sequence parallelism, which gathers them), int64 labels, fp32 lse and the ignore mask
  (13 B) per token; a transient of one fp32 logits tile (x2, forward temporaries), fp32 dh and
  a dW tile.
- recompute: "selective" recomputes the attention core (drops the s^2 terms, O and the
  log-sum-exp; with a flash kernel the gain is small); "full" keeps only each layer's input
  (2 h R per token) and rebuilds one layer at a time in backward (a transient).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmcap.config import DecoderConfig, EncoderConfig, ModelConfig

__all__ = ["ACT", "MicroBatchShape", "bart_layer_bytes", "gemma_layer_bytes", "vision_forward_bytes"]

ACT = 2  # bytes of a bf16 / fp16 activation element


@dataclass(frozen=True)
class MicroBatchShape:
    """Token counts of one micro-batch and how a TP rank splits them (b samples, s decoder
    tokens, se encoder tokens = image + prompt, TP size, sequence parallelism)."""

    b: int
    s: int  # decoder tokens
    se: int  # encoder tokens (image + prompt)
    tp: int
    sp: bool

    def rows(self, tokens: int, rep: float, shard: float) -> float:
        """Bytes of ``tokens`` x b tokens with ``rep`` R bytes and ``shard`` S bytes each."""
        return tokens * self.b * (rep / (self.tp if self.sp else 1) + shard / self.tp)


def _scores(
    heads: int, s_q: int, s_k: int, sh: MicroBatchShape, softcap: bool, dropout: bool
) -> float:
    """Saved attention-score bytes of the ``math`` back-end (Korthikanti's 5 a s^2 b)."""
    per = 2 + 4 + (2 if softcap else 0) + (3 if dropout else 0)
    return heads / sh.tp * s_q * s_k * sh.b * per


def gemma_layer_bytes(
    model: ModelConfig, sh: MicroBatchShape, *, recompute: str | None, attention: str
) -> float:
    """Saved activations of one Gemma-2 layer with gated cross-attention, one micro-batch."""
    d = model.decoder
    t = 1 if model.trainable.decoder_policy(d.arch) == "all" else 0
    h, f, nh = d.hidden_size, d.ffn_hidden_size, d.num_attention_heads
    q, kv = nh * d.head_dim, d.num_kv_heads * d.head_dim
    if recompute == "full":
        return sh.rows(sh.s, ACT * h, 0)
    core = 0 if recompute == "selective" else 2 * q + 4 * nh  # O + lse, kept by the kernel
    # 4 sandwich norms and the xattn post-norm (fused RMSNorm: bf16 input + fp32 rstd per
    # token); qkv / fc1 inputs if trainable; xattn q input, gate product.
    norm = ACT * h + 4
    rep = 5 * norm + 2 * t * h + 2 * t * h + 2 * h + 2 * h
    self_attn = 2 * (q + 2 * kv) + 2 * q + 2 * kv + core + 2 * t * q
    cross_attn = 2 * q + core + 2 * q  # Q, (O, lse), trainable proj input
    mlp = 4 * f + 2 * t * f  # fused GeGLU keeps its [gate ; up] input only; fc2 input
    shard = self_attn + cross_attn + mlp
    out = sh.rows(sh.s, rep, shard) + sh.rows(sh.se, 0, 4 * kv)
    if attention == "math" and recompute is None:
        soft = d.attn_logit_softcap is not None
        drop = d.attention_dropout > 0
        out += _scores(nh, sh.s, sh.s, sh, soft, drop) + _scores(nh, sh.s, sh.se, sh, soft, drop)
    return out


def bart_layer_bytes(
    stack: EncoderConfig | DecoderConfig,
    trainable: bool,
    sh: MicroBatchShape,
    tokens: int,
    *,
    cross: bool,
    recompute: str | None,
    attention: str,
) -> float:
    """Saved activations of one post-LN BART layer of ``stack`` (the encoder, or the Florence
    decoder with ``cross``-attention), one micro-batch of ``tokens`` tokens."""
    h, heads, ffn = stack.hidden_size, stack.num_attention_heads, stack.ffn_hidden_size
    if recompute == "full":
        return sh.rows(tokens, ACT * h, 0)
    t, drop = int(trainable), int(stack.dropout > 0)  # 1-byte CUDA dropout masks
    act_drop = int(stack.activation_dropout > 0)
    core = 0 if recompute == "selective" else 2 * h + 4 * heads
    blocks = 3 if cross else 2
    rep = blocks * (2 * t * h + drop * h + 2 * h)  # linear input, dropout mask, LN input
    # fused qkv (q, k, v views) + O + proj input; GELU input + mask + fc2 input
    shard = (6 * h + core + 2 * t * h) + (2 * ffn + act_drop * ffn + 2 * t * ffn)
    out = sh.rows(tokens, rep, shard)
    if cross:
        out += sh.rows(tokens, 0, 2 * h + core + 2 * t * h) + sh.rows(sh.se, 0, 4 * h)
    if attention == "math" and recompute is None:
        p_drop = stack.attention_dropout > 0
        out += _scores(heads, tokens, tokens, sh, False, p_drop)
        if cross:
            out += _scores(heads, tokens, sh.se, sh, False, p_drop)
    return out


def vision_forward_bytes(model: ModelConfig, b: int) -> float:
    """No-grad DaViT forward peak: ~8 live copies of its widest [b, tokens, C] map (residual,
    norm output, qkv 3x or MLP hidden 4x)."""
    v = model.vision
    side, widest = v.image_size, 0
    for stride, dim in zip(v.patch_stride, v.embed_dim):
        side //= stride
        widest = max(widest, side * side * dim)
    return 8 * ACT * b * widest
