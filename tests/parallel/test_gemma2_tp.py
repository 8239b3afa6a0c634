"""Tensor parallelism (and sequence parallelism) of the Gemma-2 cross-attention decoder on gloo.

One pool of 4 CPU ranks serves the whole module. Every case loads the SAME full weights
(random, non-zero gates, a vocabulary that needs TP padding) into a TP=1, 2 or 4 model and
compares logits, loss and the gathered gradient of every parameter and of the encoder output
against TP=1. Tolerance: fp32 with different reduction orders; observed <1e-6, bound 1e-5
absolute (+1e-4 relative for gradients).
"""

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.testing import DistributedWorkers

WORLD = 4
B, S, SE = 2, 12, 7  # S divisible by TP=4 (sequence parallel shards the sequence)


def _decoder_cfg():
    import dataclasses

    dec = get_preset("debug-gemma").decoder
    # vocab 1000 -> padded to 1024 x TP, exercising the padding mask on the last TP rank.
    return dataclasses.replace(dec, vocab_size=1000, sliding_window=4)


def _full_weights(dec, padded_vocab):
    """Deterministic full tensors for every parameter (same on all ranks)."""
    from mmcap.model.build import build_gemma2_decoder
    from mmcap.parallel.tp import full_state_dict

    torch.manual_seed(0)
    ref = build_gemma2_decoder(dec, precision=PrecisionConfig("fp32"))
    full = full_state_dict(ref)
    g = torch.Generator().manual_seed(1)
    for name, t in full.items():
        if name.endswith("gate") or "norm" in name:
            full[name] = torch.randn(t.shape, generator=g) * 0.5
    return full


def _run_case(tp: int, sp: bool):
    from megatron.core import tensor_parallel

    from mmcap.model.build import build_gemma2_decoder
    from mmcap.model.gemma2 import IGNORE_INDEX
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import (
        allreduce_sequence_parallel_grads,
        full_grads,
        load_full_state_dict,
    )

    dec = _decoder_cfg()
    # Full weights are made once at TP=1 (identical on every rank), then sharded.
    initialize_model_parallel(ParallelConfig(), seed=1234)
    full = _full_weights(dec, dec.padded_vocab_size(1))
    parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
    initialize_model_parallel(parallel, seed=1234)
    model = build_gemma2_decoder(dec, parallel, PrecisionConfig("fp32"))
    pad = model.padded_vocab_size - full["embedding.word_embeddings.weight"].shape[0]
    full["embedding.word_embeddings.weight"] = torch.cat(
        [full["embedding.word_embeddings.weight"], torch.zeros(pad, dec.hidden_size)]
    )
    load_full_state_dict(model, full)

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, dec.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, dec.vocab_size, (B, S), generator=g)
    labels[0, -3:] = IGNORE_INDEX
    enc = torch.randn(SE, B, dec.encoder_hidden_size, generator=g).requires_grad_(True)
    enc_mask = torch.ones(B, SE, dtype=torch.bool)
    enc_mask[1, 5:] = False

    tok_loss = model(ids, enc, enc_mask, labels=labels)
    loss = tok_loss.sum() / (labels != IGNORE_INDEX).sum()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            model(ids, enc, enc_mask)
        )[..., : dec.vocab_size]
    grads = full_grads(model)
    grads["embedding.word_embeddings.weight"] = grads["embedding.word_embeddings.weight"][
        : dec.vocab_size
    ]
    return {"loss": loss.detach(), "logits": logits, "grads": grads, "enc_grad": enc.grad}


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def reference(workers):
    out = workers.run(_run_case, 1, False)
    return out[0]


def _compare(ref, got):
    assert torch.allclose(got["loss"], ref["loss"], atol=1e-5, rtol=0)
    assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-5
    assert (got["enc_grad"] - ref["enc_grad"]).abs().max().item() <= 1e-5
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert got["grads"][name].shape == g.shape, name
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-4), (
            f"{name}: max diff {(got['grads'][name] - g).abs().max().item():.3g}"
        )


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tp_equals_tp1(workers, reference, tp, sp):
    results = workers.run(_run_case, tp, sp)
    assert reference["grads"]["layers.0.cross_attention.gate"].abs().item() > 0
    for rank_result in results:
        _compare(reference, rank_result)
