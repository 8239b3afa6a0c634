"""Training-step throughput of mmcap on synthetic data (``tools/benchmark.py``).

The model, DDP wrapper, megatron-core distributed optimizer and LR scheduler are built as the
trainer builds them (:mod:`mmcap.train.builder`: ``optimizer_config`` / ``build_scheduler``,
:mod:`mmcap.train.step`: ``wrap_model`` / ``build_optimizer``), and each timed step is the
trainer's :func:`mmcap.train.step.train_step`. Data are random token ids and images of the
requested lengths (every sample full length, no padding, every sample with an image), or with
``lengths`` drawn from a length model (official statistics, a dataset manifest or per-key
means) and padded as the trainer pads or packed as ``data.packing`` packs
(:mod:`mmcap.bench.synthetic`); the FLOPs of the trainer's formula
(:func:`mmcap.train.flops.batch_step_flops`) are counted on the real lengths either way.

Layout: launch with torchrun; ``tp`` x ``pp`` from the config, DP = the rest of the world.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig, require
from mmcap.model.te import resolve_transformer_impl

__all__ = ["BenchConfig", "build_bench_train_config", "run_mmcap_benchmark", "summarize"]


@dataclass
class BenchConfig:
    """One benchmark run.

    Args:
        preset: model preset (``mmcap.config.presets``).
        tp / pp: tensor / pipeline parallel sizes (DP = world size / (tp x pp)).
        micro_batch_size: samples per forward.
        global_batch_size: samples per step over all DP ranks (None: from
            ``num_microbatches``).
        num_microbatches: micro-batches per step and DP rank, used when
            ``global_batch_size`` is None.
        image_size: image side in pixels (None = the preset's).
        prompt_tokens / target_tokens: encoder prompt and decoder lengths of every sample.
        precision: "bf16", "fp16" or "fp32".
        transformer_impl / fp8: ``PrecisionConfig.transformer_impl`` ("auto", "local",
            "transformer_engine") and ``PrecisionConfig.fp8`` (None, "hybrid", "e4m3").
        compile: None, or the torch.compile backend of the transformer layers
            (``compile.enable``; :mod:`mmcap.model.compile`).
        steps / warmup: timed steps, and untimed steps before them.
        recompute: activation recompute (None, "selective", "full").
        peak_tflops: peak TFLOP/s per device for MFU (None = from the CUDA device name).
        seed: model init and data.
        lengths: None (every sample prompt_tokens / target_tokens long), or "official", a
            dataset directory / manifest, or "KEY=P/T,..." means: lengths drawn per key and
            cropped to prompt_tokens / target_tokens.
        sigma / text_only_translations: of the length model (:mod:`mmcap.bench.lengths`).
        packing: pack the samples into rows (``micro_batch_size`` then counts rows).
        pack_rows: (encoder, decoder) row lengths; None = the trainer's automatic rows.
        profile: after the timed steps, one more step under ``torch.profiler``
            (:mod:`mmcap.bench.profile`); its summary per rank goes into the result.
        profile_trace: also write that step's gzipped Chrome trace here (".rankN" added
            to the name before its extension when the world has several ranks).
        optimizer_implementation: torch AdamW's ``optim.implementation`` (fused, foreach,
            for-loop) when megatron-core falls back to it (no TE / apex).
    """

    preset: str = "debug-gemma"
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 2
    global_batch_size: int | None = None
    num_microbatches: int = 1
    image_size: int | None = None
    prompt_tokens: int = 16
    target_tokens: int = 16
    precision: str = "bf16"
    transformer_impl: str = "auto"
    fp8: str | None = None
    compile: str | None = None
    steps: int = 5
    warmup: int = 2
    recompute: str | None = None
    peak_tflops: float | None = None
    seed: int = 1234
    lengths: str | None = None
    sigma: float = 0.5
    text_only_translations: bool = False
    packing: bool = False
    pack_rows: tuple[int, int] | None = None
    profile: bool = False
    profile_trace: str | None = None
    optimizer_implementation: str = "fused"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "micro_batch_size", "num_microbatches", "steps"):
            require(getattr(self, name) >= 1, f"benchmark.{name}", "must be >= 1")
        require(self.warmup >= 0, "benchmark.warmup", "must be >= 0")
        require(self.prompt_tokens >= 1, "benchmark.prompt_tokens", "must be >= 1")
        require(self.target_tokens >= 1, "benchmark.target_tokens", "must be >= 1")
        require(
            self.precision in ("bf16", "fp16", "fp32"),
            "benchmark.precision",
            f"must be bf16, fp16 or fp32, got {self.precision!r}",
        )
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "benchmark.peak_tflops",
            "must be > 0 (or unset: from the device name)",
        )

    def global_batch(self, dp: int) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size
        return self.micro_batch_size * self.num_microbatches * dp


def build_bench_train_config(b: BenchConfig, dp: int):
    """The :class:`mmcap.train.config.TrainConfig` the trainer would run for this benchmark
    (its ``model_config()``, ``optimizer_config`` and scheduler are the trainer's)."""
    from mmcap.model.compile import CompileConfig
    from mmcap.train.config import TrainConfig

    model = {"vision": {"image_size": b.image_size}} if b.image_size is not None else {}
    cfg = TrainConfig(
        preset=b.preset,
        model=model,
        parallel=ParallelConfig(tensor_parallel=b.tp, pipeline_parallel=b.pp),
        precision=PrecisionConfig(b.precision, transformer_impl=b.transformer_impl, fp8=b.fp8),
        train_steps=b.warmup + b.steps,
        global_batch_size=b.global_batch(dp),
        micro_batch_size=b.micro_batch_size,
        recompute=b.recompute,
        seed=b.seed,
        compile=CompileConfig(enable=b.compile is not None, backend=b.compile or "inductor"),
    )
    cfg.optim = dataclasses.replace(
        cfg.optim,
        warmup_steps=0,
        decay_style="constant",
        implementation=b.optimizer_implementation,
    )
    if b.packing:
        require(
            cfg.global_batch_size % dp == 0,
            "global_batch_size",
            f"{cfg.global_batch_size} is not a multiple of the data-parallel size {dp}",
        )
    else:
        cfg.num_microbatches(dp)  # the batch layout error names global_batch_size
    return cfg


def synthetic_microbatches(model_cfg, b: BenchConfig, n: int, device, seed: int):
    """``n`` micro-batches of random ids / images, every sample full length with an image
    (the official-style comparison's data, :mod:`mmcap.bench.hf_reference`)."""
    from mmcap.model.stage_io import MicroBatch

    g = torch.Generator().manual_seed(seed)
    enc_vocab, dec_vocab = model_cfg.encoder.vocab_size, model_cfg.decoder.vocab_size
    size, mbs = model_cfg.vision.image_size, b.micro_batch_size
    out = []
    for _ in range(n):
        out.append(
            MicroBatch(
                prompt_ids=torch.randint(3, enc_vocab, (mbs, b.prompt_tokens), generator=g).to(
                    device
                ),
                prompt_mask=torch.ones(mbs, b.prompt_tokens, dtype=torch.bool, device=device),
                decoder_input_ids=torch.randint(
                    3, dec_vocab, (mbs, b.target_tokens), generator=g
                ).to(device),
                labels=torch.randint(3, dec_vocab, (mbs, b.target_tokens), generator=g).to(device),
                pixel_values=torch.randn(mbs, 3, size, size, generator=g).to(device),
                num_image_tokens=model_cfg.vision.num_image_tokens,
            )
        )
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> tuple[float, str]:
    """(GiB, what): CUDA max allocated on GPU, the process's peak RSS elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def summarize(
    step_times: list[float],
    *,
    samples: int,
    images: int,
    target_tokens: int,
    flops: float,
    world_size: int,
    peak: float | None,
) -> dict:
    """Throughput numbers of a list of step times (seconds) for one global batch shape."""
    from mmcap.train.flops import mfu

    step = statistics.median(step_times)
    per_gpu = flops / step / world_size
    return {
        "step_time_s": step,
        "step_time_mean_s": statistics.fmean(step_times),
        "step_times_s": step_times,
        "samples_per_s": samples / step,
        "images_per_s": images / step,
        "target_tokens_per_s": target_tokens / step,
        "model_tflop_per_step": flops / 1e12,
        "tflops_per_gpu": per_gpu / 1e12,
        "peak_tflops_per_gpu": peak,
        "mfu": mfu(per_gpu, peak),
    }


def run_mmcap_benchmark(b: BenchConfig) -> dict:
    """Build the model as the trainer does and time ``b.steps`` training steps (collective:
    every rank of the torchrun world calls it). Returns the result on every rank."""
    from megatron.core import parallel_state

    from mmcap.bench.phases import PhaseTimer
    from mmcap.model.build import build_model_chunks
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.builder import build_scheduler, optimizer_config
    from mmcap.train.data import current_device
    from mmcap.train.flops import batch_step_flops, peak_tflops
    from mmcap.train.step import build_optimizer, describe_optimizer, train_step, wrap_model

    initialize_model_parallel(
        ParallelConfig(tensor_parallel=b.tp, pipeline_parallel=b.pp), seed=b.seed
    )
    world = dist.get_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    cfg = build_bench_train_config(b, dp)
    model_cfg = cfg.model_config()
    device = current_device()

    chunks = build_model_chunks(model_cfg, cfg.parallel, cfg.precision, recompute=cfg.recompute)
    if cfg.compile.enable:  # as the trainer (mmcap.train.builder); compiles in the warmup
        from mmcap.model.compile import compile_layers

        compile_layers(chunks, backend=cfg.compile.backend)
    ddp = wrap_model(chunks, grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32)
    optimizer = build_optimizer(ddp, optimizer_config(cfg), implementation=cfg.optim.implementation)
    scheduler = build_scheduler(cfg, optimizer)
    dp_rank = parallel_state.get_data_parallel_rank()
    from mmcap.bench.synthetic import synthetic_batch

    data = synthetic_batch(
        model_cfg,
        global_batch=cfg.global_batch_size,
        dp=dp,
        dp_rank=dp_rank,
        micro_batch_size=b.micro_batch_size,
        prompt_tokens=b.prompt_tokens,
        target_tokens=b.target_tokens,
        lengths=b.lengths,
        sigma=b.sigma,
        text_only_translations=b.text_only_translations,
        packing=b.packing,
        rows=b.pack_rows,
        device=device,
        seed=b.seed,
        pipeline_parallel=b.pp,
    )
    mbs = data.microbatches

    def step():
        return train_step(
            ddp, optimizer, mbs, encoder_hidden=model_cfg.encoder.hidden_size, scheduler=scheduler
        )

    losses = []
    for _ in range(b.warmup):
        losses.append(step().loss)
    _reset_peak_memory()
    timer = PhaseTimer(ddp, optimizer)
    times = []
    try:
        for _ in range(b.steps):
            timer.begin_step()
            _sync()
            t0 = time.perf_counter()
            losses.append(step().loss)
            _sync()
            times.append(time.perf_counter() - t0)
            timer.end_step(times[-1])
    finally:
        timer.detach()
    profiles = None
    if b.profile or b.profile_trace:  # one more step (collective), not timed above
        from mmcap.bench.profile import profile_step

        trace = b.profile_trace
        if trace and world > 1:  # trace.json.gz -> trace.rank3.json.gz
            head, sep, name = trace.rpartition("/")
            stem, dot, ext = name.partition(".")
            trace = f"{head}{sep}{stem}.rank{dist.get_rank()}{dot}{ext}"
        try:  # a profiler that fails (CUPTI, disk) must not cost the measured results
            mine = profile_step(step, trace=trace)
        except Exception as e:  # noqa: BLE001
            mine = {"error": f"{type(e).__name__}: {e}"[:300]}
        profiles = [None] * world
        dist.all_gather_object(profiles, mine)
    # The slowest rank sets the step time; every rank reports the same numbers.
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    times = t.cpu().tolist()
    phases_all = [None] * world
    dist.all_gather_object(phases_all, timer.mean())
    mem, mem_kind = peak_memory_gib()
    mems = [None] * world
    dist.all_gather_object(mems, mem)

    samples = cfg.global_batch_size
    flops = batch_step_flops(
        model_cfg, data.prompt_lengths, data.target_lengths, data.has_image
    )
    peak = b.peak_tflops if b.peak_tflops is not None else peak_tflops(dtype=b.precision)
    result = summarize(
        times,
        samples=samples,
        images=int(data.has_image.sum()),
        target_tokens=int(data.target_lengths.sum()),
        flops=flops,
        world_size=world,
        peak=peak,
    )
    useful = [None] * world
    dist.all_gather_object(useful, data.useful)
    result.update(
        impl="mmcap" + ("" if b.fp8 is None else f" fp8-{b.fp8}")
        + ("" if b.compile is None else f" compiled-{b.compile}"),
        transformer_impl=resolve_transformer_impl(cfg.precision),
        optimizer=describe_optimizer(optimizer),
        layout={"tp": b.tp, "pp": b.pp, "dp": dp, "world_size": world},
        num_microbatches=len(mbs),
        packing=b.packing,
        pack_rows=data.rows,
        lengths=b.lengths or f"fixed {b.prompt_tokens}/{b.target_tokens}",
        useful_encoder=min(u[0] for u in useful),
        useful_decoder=min(u[1] for u in useful),
        mean_prompt_tokens=float(data.prompt_lengths.mean()),
        mean_target_tokens=float(data.target_lengths.mean()),
        global_batch_size=samples,
        image_size=model_cfg.vision.image_size,
        num_image_tokens=model_cfg.vision.num_image_tokens,
        phases_s={k: max(p[k] for p in phases_all) for k in phases_all[0]},
        phases_s_per_rank=phases_all,
        peak_memory_gib=max(mems),
        peak_memory_kind=mem_kind,
        losses=losses,
        trainable_params=sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad),
        total_params=sum(p.numel() for c in chunks for p in c.parameters()),
    )
    if profiles is not None:
        result["profile_per_rank"] = profiles
    parallel_state.destroy_model_parallel()
    return result  # the model and optimizer are freed with this frame


def check_layout(b: BenchConfig) -> None:
    """Fail early when the world size does not fit the layout (names the flags)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (b.tp * b.pp):
        raise ConfigError(
            f"benchmark: world size {world} is not divisible by --tp {b.tp} x --pp {b.pp}; "
            f"launch a multiple of {b.tp * b.pp} processes with torchrun"
        )
