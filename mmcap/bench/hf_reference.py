"""The official-style model and training step (``tools/benchmark.py --compare hf``).

The paper's implementation trains Hugging Face modules in plain PyTorch: transformers' Gemma-2
/ BART layers with eager attention, logits over the full decoder vocabulary cast to float32 for
the cross-entropy, the frozen vision tower left in train mode, torch AdamW. This module builds
that model from transformers classes through mmcap's HF classes
(:class:`mmcap.hf.modeling_mmcap.MmcapCaptionerForConditionalGeneration` on
:func:`mmcap.hf.convert_out.hf_config` of the same :class:`mmcap.config.ModelConfig`), with the
trainable set of ``model.trainable`` (names listed in :func:`hf_trainable`), and times the same
batch shape as :func:`mmcap.bench.train_bench.run_mmcap_benchmark`.
"""

from __future__ import annotations

import time

import torch

from mmcap.bench.train_bench import BenchConfig, peak_memory_gib, summarize

__all__ = ["build_hf_model", "hf_trainable", "run_hf_benchmark"]

# HF parameter names that train under the "cross_attention" decoder policy (Gemma sizes): the
# gated cross-attention blocks, their gates and post-norms, the tied embedding / LM head.
_HF_XATTN_TRAINABLE = (
    ".encoder_attn.",
    ".encoder_attn_gate",
    ".post_encoder_attention_layernorm.",
    "decoder.embed_tokens.",
    "lm_head.",
)


def hf_trainable(name: str, model_cfg) -> bool:
    """Whether HF parameter ``name`` trains under ``model_cfg.trainable`` (mmcap's policy)."""
    t = model_cfg.trainable
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return t.vision
    if name.startswith("model.language_model.encoder."):
        return t.encoder
    if t.decoder_policy(model_cfg.decoder.arch) == "all":
        return True
    return any(k in f".{name}" for k in _HF_XATTN_TRAINABLE)


def build_hf_model(model_cfg, dtype: torch.dtype, device):
    """The official-style model: eager attention, ``dtype`` weights, train mode, frozen parts
    per ``model_cfg.trainable`` (requires_grad only: the frozen tower stays in train mode)."""
    from mmcap.hf.convert_out import hf_config
    from mmcap.hf.modeling_mmcap import MmcapCaptionerForConditionalGeneration

    config = hf_config(model_cfg)
    config._attn_implementation = "eager"
    for sub in ("vision_config", "text_config"):
        sub_cfg = getattr(config, sub, None)
        if sub_cfg is not None:
            sub_cfg._attn_implementation = "eager"
    with torch.device(device):
        model = MmcapCaptionerForConditionalGeneration(config).to(dtype)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(hf_trainable(name, model_cfg))
    return model


def _hf_batches(model, model_cfg, b: BenchConfig, n: int, device, seed: int):
    """``n`` micro-batches: [image placeholders ; prompt] encoder ids, images, decoder ids."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img, mbs = model_cfg.vision.num_image_tokens, b.micro_batch_size
    size = model_cfg.vision.image_size
    out = []
    for _ in range(n):
        prompt = torch.randint(3, model_cfg.encoder.vocab_size, (mbs, b.prompt_tokens), generator=g)
        ids = torch.cat([torch.full((mbs, n_img), cfg.image_token_id), prompt], dim=1)
        dec = torch.randint(3, model_cfg.decoder.vocab_size, (mbs, b.target_tokens), generator=g)
        labels = torch.randint(3, model_cfg.decoder.vocab_size, (mbs, b.target_tokens), generator=g)
        out.append(
            dict(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                pixel_values=torch.randn(mbs, 3, size, size, generator=g).to(
                    device, dtype=model.dtype
                ),
                decoder_input_ids=dec.to(device),
                labels=labels.to(device),
            )
        )
    return out


def run_hf_benchmark(b: BenchConfig, model_cfg, num_microbatches: int, peak: float | None) -> dict:
    """Time ``b.steps`` official-style steps (single process: world size 1) on the batch shape
    of the mmcap run: ``num_microbatches`` x ``micro_batch_size`` samples per step."""
    from mmcap.train.data import current_device
    from mmcap.train.flops import batch_step_flops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[b.precision]
    device = current_device()
    torch.manual_seed(b.seed)
    model = build_hf_model(model_cfg, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # The trainer's AdamW hyper-parameters (mmcap.train.config.OptimConfig defaults).
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    batches = _hf_batches(model, model_cfg, b, num_microbatches, device, seed=b.seed)
    scaler = torch.amp.GradScaler(enabled=b.precision == "fp16")

    def step() -> float:
        total = torch.zeros((), device=device)
        for mb in batches:
            loss = model(**mb).loss / num_microbatches  # mean CE over the micro-batch's tokens
            scaler.scale(loss).backward()
            total += loss.detach()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return total.item()  # one host sync per step, as mmcap's train_step

    losses = [step() for _ in range(b.warmup)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(b.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    samples = num_microbatches * b.micro_batch_size
    flops = batch_step_flops(
        model_cfg, [b.prompt_tokens] * samples, [b.target_tokens] * samples, [True] * samples
    )
    result = summarize(
        times,
        samples=samples,
        images=samples,
        target_tokens=samples * b.target_tokens,
        flops=flops,
        world_size=1,
        peak=peak,
    )
    mem, kind = peak_memory_gib()
    result.update(
        impl="hf-official-style",
        optimizer="torch AdamW default",  # torch's choice: foreach on CUDA
        global_batch_size=samples,
        num_microbatches=num_microbatches,
        peak_memory_gib=mem,
        peak_memory_kind=kind,
        losses=losses,
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
    )
    return result  # the model and optimizer are freed with this frame
