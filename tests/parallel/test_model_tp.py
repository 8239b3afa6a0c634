"""The whole captioning model (frozen vision tower, BART encoder, decoder) under tensor
parallelism on gloo: TP=2 (with and without sequence parallelism) equals TP=1 for the
Florence-size and the Gemma-size debug models, and the per-rank parameter counts of
``mmcap.model.size`` equal what each rank actually builds (TP=2, and PP=2).

Tolerance: fp32 with different reduction orders; observed < 1e-6, bound 1e-5 absolute
(+1e-4 relative for gradients).
"""

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.testing import DistributedWorkers

FP32 = PrecisionConfig("fp32")


def _run(preset: str, tp: int, sp: bool):
    from megatron.core import tensor_parallel

    from mmcap.model.build import build_model
    from mmcap.model.decoder_base import IGNORE_INDEX
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import (
        allreduce_sequence_parallel_grads,
        full_grads,
        full_state_dict,
        load_full_state_dict,
    )

    cfg = get_preset(preset)
    initialize_model_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(0)
    full = full_state_dict(build_model(cfg, precision=FP32))
    g = torch.Generator().manual_seed(1)
    for name, t in full.items():
        if name.endswith(".gate"):
            full[name] = torch.randn(t.shape, generator=g)  # make cross-attention matter
    parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
    initialize_model_parallel(parallel, seed=1234)
    model = build_model(cfg, parallel, FP32).train()  # vision stays in eval (frozen)
    # Dropout would draw differently per layout: compare the deterministic model.
    for m in model.modules():
        for attr in ("dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
        if hasattr(m, "spec"):
            m.spec = m.spec.replace(dropout_p=0.0)
    load_full_state_dict(model, full)

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    prompt = torch.randint(3, 900, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.bool)
    prompt_mask[1, 4:] = False
    dec = torch.randint(3, 900, (2, 8), generator=g)
    labels = torch.randint(3, 900, (2, 8), generator=g)
    labels[0, -2:] = IGNORE_INDEX
    tok = model(prompt, dec, prompt_mask, pixel_values=pixels, labels=labels)
    loss = tok.sum() / (labels != IGNORE_INDEX).sum()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            model(prompt, dec, prompt_mask, pixel_values=pixels)
        )[..., : cfg.decoder.vocab_size]
    grads = full_grads(model)
    for key in (
        "encoder.embedding.word_embeddings.weight",
        "decoder.embedding.word_embeddings.weight",
    ):
        if key in grads:
            grads[key] = grads[key][:1000]
    frozen_with_grad = [
        n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
    ]
    return {
        "loss": loss.detach(),
        "logits": logits,
        "grads": grads,
        "frozen_with_grad": frozen_with_grad,
    }


def _local_counts(tp: int, pp: int):
    from mmcap.model.build import build_model
    from mmcap.model.size import count_parameters
    from mmcap.parallel import initialize_model_parallel

    cfg = get_preset("debug-gemma")
    initialize_model_parallel(ParallelConfig(), seed=None)
    expected = count_parameters(cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    initialize_model_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=1)
    from megatron.core import parallel_state as ps

    model = build_model(cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), FP32)
    key = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return sum(p.numel() for p in model.parameters()), expected.per_rank[key]


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(2, timeout=600) as w:
        yield w


@pytest.mark.parametrize("preset", ["debug-florence", "debug-gemma"])
def test_whole_model_tp2_equals_tp1(workers, preset):
    ref = workers.run(_run, preset, 1, False)[0]
    assert not ref["frozen_with_grad"]
    assert not any(n.startswith("vision.") for n in ref["grads"])  # frozen tower: no grads
    for sp in (False, True):
        for got in workers.run(_run, preset, 2, sp):
            assert torch.allclose(got["loss"], ref["loss"], atol=1e-5, rtol=0)
            assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-5
            assert set(got["grads"]) == set(ref["grads"])
            for name, gref in ref["grads"].items():
                assert torch.allclose(got["grads"][name], gref, atol=1e-5, rtol=1e-4), (
                    f"{preset} sp={sp} {name}: {(got['grads'][name] - gref).abs().max():.3g}"
                )


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_per_rank_counts_match_built_stages(workers, tp, pp):
    for built, expected in workers.run(_local_counts, tp, pp):
        assert built == expected
