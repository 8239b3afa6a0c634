"""Model FLOPs of the captioning model per sample and per step, TFLOP/s and MFU.

Counts are analytic matmul FLOPs (2 per multiply-add) of the real, unpadded lengths of one
sample, except the vision tower, which is measured. Norms, activations, softmax, soft-caps,
RoPE, gates, residual adds, bias adds, embedding lookups and the loss are not counted (they
are not matmuls).

Notation (one sample): ``I`` image tokens (``vision.num_image_tokens``; 0 for a text-only
sample, which also skips the vision tower), ``P`` prompt tokens, ``S = I + P`` encoder tokens,
``T`` target (decoder) tokens. Encoder: ``L_e`` layers, width ``d``, FFN ``f`` (MHA, so the
attention width is ``d``). Decoder: ``L`` layers, width ``D``, FFN ``F``, ``a`` query heads,
``g`` kv heads, head dim ``h``, encoder width ``E`` read by cross-attention, ``V`` the padded
vocabulary (``DecoderConfig.padded_vocab_size()``, TP = 1 padding).

Forward FLOPs of one sample::

    vision  = FlopCounterMode(VisionTower(1 image of vision.image_size px))   (0 without image)
    encoder = L_e * ( 2*S*d*3d + 2*S*d*d          QKV and output projections
                    + 2*S*d*f * 2                 fc1, fc2
                    + 2*2*S*S*d )                 QK^T and AV, every key attended
    decoder = sum over layers l of
                2*T*D*(a + 2g)*h + 2*T*a*h*D      self-attention QKV (GQA) and output
              + 2*2*K_l*a*h                       self-attention QK^T and AV
              + 2*T*D*a*h + 2*S*E*2g*h            cross-attention Q and KV (from the encoder)
              + 2*T*a*h*D + 2*2*T*S*a*h           cross-attention output, QK^T and AV
              + 2*T*D*F * m                       MLP: m = 3 (Gemma GeGLU), 2 (BART)
            + 2*T*D*V                             tied LM head
    K_l = sum_{i=0..T-1} keys(i): keys(i) = i + 1 (causal), min(i + 1, W) (Gemma-2 sliding
          window W on ``DecoderConfig.is_sliding(l)`` layers); exactly
          T(T+1)/2, or for T > W: W(W+1)/2 + (T-W)*W.

For the Gemma sizes every layer has the cross-attention block (``gated_cross_attention``);
BART decoders have ``a = g`` and ``a*h = D``. ``dense_attention=True`` counts ``K_l = T*T``
(the full score matrix the plain-PyTorch ``math`` attention back-end computes before masking);
the default counts the keys actually attended (what flash/flex/TE compute, up to tiling).

The vision tower (strided and depth-wise convolutions, DaViT window and channel attention,
image projector) is measured instead of derived: ``torch.utils.flop_counter.FlopCounterMode``
over one forward of a 1-image batch built on the meta device (no memory, no compute), with
SDPA forced to its math back-end so that window attention is counted as matmuls. The result is
cached per vision config. (224 px: Florence-2-base 39.8 GFLOPs, -large 154.0; 768 px: 380.7,
1490.4.)

Training FLOPs of one sample ("model FLOPs", the MFU convention: activation recompute is NOT
counted). The backward of a linear ``Y = X W`` costs one forward for ``dX`` (dgrad, needed when
``X`` depends on a trainable parameter) and one for ``dW`` (wgrad, when ``W`` trains); the
backward of the weightless attention matmuls QK^T and AV costs two forwards (gradients to both
operands). With ``lin`` = the linear terms and ``core`` = the attention terms of a component::

    step = vision * (1, or 3 if trainable.vision)
         + encoder: 3 * (lin + core)                     if trainable.encoder
                    2 * lin + 3 * core                   elif trainable.vision (dgrad only)
                    lin + core                           else (forward only)
         + decoder: 3 * core + lin + dgrad_lin + wgrad_lin
    dgrad_lin = lin - (cross-attention KV projections, unless the encoder output needs a
                gradient, i.e. the encoder or the vision tower trains)
    wgrad_lin = lin (every decoder linear incl. the LM head)    trainable.decoder "all"
              = cross-attention Q, KV and O projections + LM head          "cross_attention"

The frozen vision tower runs forward only, under no_grad; with a feature cache it does not
run at all (``count_vision=False`` drops the term; the image tokens still enter the encoder).
A frozen encoder (with a frozen tower) needs no dgrad: nothing before it trains. The decoder
needs dgrad through every layer because trainable parts (the tied embedding at the bottom, the
cross-attention in every layer) sit below every frozen matmul; hence, with the paper's
trainable encoder, encoder + decoder ``step < 3 * forward`` for the Gemma policy and
``= 3 * forward`` for the Florence policy. With a frozen encoder, megatron-core's linear
computes the cross-attention KV dgrad anyway (its backward always computes the input
gradient); that hardware work is not model FLOPs and is not counted. A trainable vision tower
is counted as 3x its forward (over-counting the first convolution's unneeded dgrad); the paper
never trains it.

Batches (:func:`batch_step_flops`) sum per-sample counts over the real lengths: compute spent
on padding is not counted. TFLOP/s per GPU = batch FLOPs / step time / number of GPUs; MFU =
that / :func:`peak_tflops`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from mmcap.config import DecoderConfig, EncoderConfig, ModelConfig, VisionConfig

__all__ = [
    "attended_keys",
    "batch_step_flops",
    "forward_flop_terms",
    "forward_flops",
    "mfu",
    "peak_tflops",
    "peak_tflops_for_name",
    "step_flops",
    "vision_forward_flops",
]

# Decoder terms that are linear layers (have a weight); the others are attention cores.
_DECODER_LINEAR = (
    "decoder.self_attention.linear",
    "decoder.cross_attention.q_o",
    "decoder.cross_attention.kv",
    "decoder.mlp",
    "decoder.lm_head",
)
# Decoder weights that train under the "cross_attention" policy (Gemma sizes).
_DECODER_XATTN_POLICY_WGRAD = (
    "decoder.cross_attention.q_o",
    "decoder.cross_attention.kv",
    "decoder.lm_head",
)


def _linear(tokens: int, n_in: int, n_out: int) -> float:
    return 2.0 * tokens * n_in * n_out


def _attention(query_key_pairs: int, heads: int, head_dim: int) -> float:
    """QK^T and AV over ``query_key_pairs`` (query, key) pairs."""
    return 2.0 * 2.0 * query_key_pairs * heads * head_dim


def attended_keys(seq_len: int, window: int | None = None) -> int:
    """Sum over query positions of the keys a causal query attends: ``sum_i min(i + 1, W)``.

    Args:
        seq_len: queries = keys (decoder self-attention).
        window: Gemma-2 sliding window (keys counting the query itself), None = global causal.
    """
    t = seq_len
    if window is None or t <= window:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


@functools.cache
def _vision_flops_cached(key: tuple) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmcap.model.vision import VisionTower

    cfg = VisionConfig(*key)
    # Meta device: no memory, no compute (tests check it equals a real CPU run). SDPA's math
    # back-end decomposes into counted matmuls (the fused CPU / CUDA kernels are not all counted).
    with torch.device("meta"):
        tower = VisionTower(cfg).freeze()
        pixels = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        tower(pixels)
    return float(counter.get_total_flops())


def vision_forward_flops(vision: VisionConfig) -> float:
    """Measured forward FLOPs of the vision tower (DaViT + projector) for one image (cached).

    Args:
        vision: the vision config (``image_size`` sets the resolution).
    """
    return _vision_flops_cached(dataclasses.astuple(vision))


def _encoder_terms(enc: EncoderConfig, s: int) -> dict[str, float]:
    d, f, heads = enc.hidden_size, enc.ffn_hidden_size, enc.num_attention_heads
    linear = _linear(s, d, 3 * d) + _linear(s, d, d) + 2 * _linear(s, d, f)  # qkv, o, fc1, fc2
    attention = _attention(s * s, heads, d // heads)  # bidirectional: every key
    return {
        "encoder.linear": enc.num_layers * linear,
        "encoder.attention": enc.num_layers * attention,
    }


def _decoder_terms(dec: DecoderConfig, t: int, s: int, dense_attention: bool) -> dict[str, float]:
    d, a, g, h = dec.hidden_size, dec.num_attention_heads, dec.num_kv_heads, dec.head_dim
    has_xattn = dec.arch == "bart" or dec.gated_cross_attention
    n = dec.num_layers
    windows = [
        dec.sliding_window if dec.arch == "gemma2" and dec.is_sliding(i) else None for i in range(n)
    ]
    pairs = n * t * t if dense_attention else sum(attended_keys(t, w) for w in windows)
    self_linear = _linear(t, d, (a + 2 * g) * h) + _linear(t, a * h, d)  # fused QKV (GQA), o
    mlp_mats = 3 if dec.arch == "gemma2" else 2  # GeGLU gate + up + down | fc1 + fc2
    terms = {
        "decoder.self_attention.linear": n * self_linear,
        "decoder.self_attention.core": _attention(pairs, a, h),
        "decoder.cross_attention.q_o": 0.0,
        "decoder.cross_attention.kv": 0.0,
        "decoder.cross_attention.core": 0.0,
        "decoder.mlp": n * mlp_mats * _linear(t, d, dec.ffn_hidden_size),
        "decoder.lm_head": _linear(t, d, dec.padded_vocab_size()),
    }
    if has_xattn:
        terms["decoder.cross_attention.q_o"] = n * (_linear(t, d, a * h) + _linear(t, a * h, d))
        terms["decoder.cross_attention.kv"] = n * _linear(s, dec.encoder_hidden_size, 2 * g * h)
        terms["decoder.cross_attention.core"] = n * _attention(t * s, a, h)
    return terms


def forward_flop_terms(
    model_cfg: ModelConfig,
    prompt_tokens: int,
    target_tokens: int,
    with_image: bool = True,
    *,
    dense_attention: bool = False,
) -> dict[str, float]:
    """Forward FLOPs of one sample by term (see the module docstring for the formula).

    Keys: ``vision``, ``encoder.linear``, ``encoder.attention``,
    ``decoder.self_attention.linear`` (QKV + output), ``decoder.self_attention.core``
    (QK^T + AV), ``decoder.cross_attention.q_o``, ``decoder.cross_attention.kv``,
    ``decoder.cross_attention.core``, ``decoder.mlp``, ``decoder.lm_head``.

    Args:
        model_cfg: the model.
        prompt_tokens: real (unpadded) prompt tokens of the sample.
        target_tokens: real decoder input tokens of the sample.
        with_image: the sample has an image (vision tower + image tokens); False = text only.
        dense_attention: count every (query, key) pair of decoder self-attention (what the
            ``math`` back-end computes) instead of the attended ones.
    """
    if prompt_tokens < 0 or target_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got {prompt_tokens}, {target_tokens}")
    s = prompt_tokens + (model_cfg.vision.num_image_tokens if with_image else 0)
    terms = {"vision": vision_forward_flops(model_cfg.vision) if with_image else 0.0}
    terms.update(_encoder_terms(model_cfg.encoder, s))
    terms.update(_decoder_terms(model_cfg.decoder, target_tokens, s, dense_attention))
    return terms


def forward_flops(
    model_cfg: ModelConfig,
    prompt_tokens: int,
    target_tokens: int,
    with_image: bool = True,
    *,
    dense_attention: bool = False,
) -> dict[str, float]:
    """Forward FLOPs of ONE sample per component: ``vision``, ``encoder``, ``decoder`` (the
    decoder includes the LM head). Arguments: as :func:`forward_flop_terms`."""
    terms = forward_flop_terms(
        model_cfg, prompt_tokens, target_tokens, with_image, dense_attention=dense_attention
    )
    out = {"vision": 0.0, "encoder": 0.0, "decoder": 0.0}
    for key, value in terms.items():
        out[key.split(".", 1)[0]] += value
    return out


def step_flops(
    model_cfg: ModelConfig,
    prompt_tokens: int,
    target_tokens: int,
    with_image: bool = True,
    *,
    count_vision: bool = True,
    dense_attention: bool = False,
    attention: bool = True,
) -> float:
    """Training (forward + backward) model FLOPs of ONE sample; formula in the module docstring.

    Args:
        model_cfg: the model (``model_cfg.trainable`` decides the backward).
        prompt_tokens / target_tokens / with_image: as :func:`forward_flop_terms`.
        count_vision: False when the image tokens come precomputed from a feature cache (the
            tower does not run in the step; the image tokens still enter the encoder).
        dense_attention: as :func:`forward_flop_terms`.
        attention: False counts the linear layers only (no QK^T / AV): the cost of padding
            tokens in packed rows, which document-masked varlen attention skips.
    """
    terms = forward_flop_terms(
        model_cfg, prompt_tokens, target_tokens, with_image, dense_attention=dense_attention
    )
    if not attention:
        for k in ("encoder.attention", "decoder.self_attention.core", "decoder.cross_attention.core"):
            terms[k] = 0.0
    train = model_cfg.trainable
    vision = terms["vision"] * (3 if train.vision else 1) if count_vision else 0.0

    enc_lin, enc_core = terms["encoder.linear"], terms["encoder.attention"]
    if train.encoder:
        encoder = 3 * (enc_lin + enc_core)
    elif train.vision:  # gradient flows through the frozen encoder to the tower
        encoder = 2 * enc_lin + 3 * enc_core
    else:
        encoder = enc_lin + enc_core

    lin = sum(terms[k] for k in _DECODER_LINEAR)
    core = terms["decoder.self_attention.core"] + terms["decoder.cross_attention.core"]
    encoder_out_needs_grad = train.encoder or train.vision
    dgrad = lin - (0.0 if encoder_out_needs_grad else terms["decoder.cross_attention.kv"])
    if train.decoder_policy(model_cfg.decoder.arch) == "all":
        wgrad = lin
    else:  # "cross_attention": gated cross-attention projections + tied embedding / LM head
        wgrad = sum(terms[k] for k in _DECODER_XATTN_POLICY_WGRAD)
    return vision + encoder + 3 * core + lin + dgrad + wgrad


def batch_step_flops(
    model_cfg: ModelConfig,
    prompt_lengths: Sequence[int],
    target_lengths: Sequence[int],
    has_image: Sequence[bool],
    *,
    count_vision: bool = True,
) -> float:
    """Training model FLOPs of a batch: :func:`step_flops` summed over its samples.

    Uses each sample's real (unpadded) lengths: compute spent on padding is NOT counted.

    Args:
        model_cfg: the model.
        prompt_lengths / target_lengths / has_image: per sample (equal lengths).
        count_vision: see :func:`step_flops`.
    """
    if not len(prompt_lengths) == len(target_lengths) == len(has_image):
        raise ValueError(
            f"per-sample sequences differ in length: prompt_lengths {len(prompt_lengths)}, "
            f"target_lengths {len(target_lengths)}, has_image {len(has_image)}"
        )
    return float(
        sum(
            step_flops(model_cfg, int(p), int(t), bool(i), count_vision=count_vision)
            for p, t, i in zip(prompt_lengths, target_lengths, has_image)
        )
    )


# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: (bf16/fp16, tf32).
# First matching row wins (so "H100 PCIe" precedes the H100 SXM row, whose CUDA name is
# "NVIDIA H100 80GB HBM3").
_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("h200",), 989.4, 494.7),
    (("h100", "pcie"), 756.0, 378.0),
    (("h100", "sxm"), 989.4, 494.7),
    (("h100", "hbm3"), 989.4, 494.7),
    (("a100",), 312.0, 156.0),
)
_DTYPE_COLUMN = {
    "bf16": 0,
    "bfloat16": 0,
    "fp16": 0,
    "float16": 0,
    "fp32": 1,
    "float32": 1,
    "tf32": 1,
}


def peak_tflops_for_name(name: str, dtype: str | torch.dtype = "bf16") -> float | None:
    """Dense peak TFLOP/s of a GPU from its CUDA name (``torch.cuda.get_device_name``).

    Args:
        name: e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB".
        dtype: "bf16"/"fp16" (tensor-core 16-bit) or "fp32"/"tf32" (TF32 tensor cores);
            torch dtypes work too.

    Returns:
        TFLOP/s, or None for a GPU not in the table.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPE_COLUMN:
        raise ValueError(f"dtype {dtype!r} unknown; choose one of {sorted(_DTYPE_COLUMN)}")
    lowered = name.lower()
    for needles, *peaks in _PEAK_TFLOPS:
        if all(n in lowered for n in needles):
            return peaks[_DTYPE_COLUMN[dtype]]
    return None


def peak_tflops(
    device: int | str | torch.device | None = None, dtype: str | torch.dtype = "bf16"
) -> float | None:
    """Dense peak TFLOP/s of one GPU, from the CUDA device name; None on CPU or unknown GPUs.

    Args:
        device: CUDA device (None = the current one).
        dtype: see :func:`peak_tflops_for_name`.
    """
    if device is not None and not isinstance(device, int):
        device = torch.device(device)
        if device.type != "cuda":
            return None
    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_s_per_gpu: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.046 = 4.6%).

    Args:
        flops_per_s_per_gpu: achieved model FLOP/s of one GPU (not TFLOP/s).
        peak: the GPU's peak in TFLOP/s (:func:`peak_tflops`), or None (then None).
    """
    if peak is None or peak <= 0:
        return None
    return flops_per_s_per_gpu / (peak * 1e12)
