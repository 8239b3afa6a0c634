"""The decoder's loss through mmcap.ops.softcap_ce (reference path on CPU) equals the unfused
path it replaced (output_layer -> final soft-cap -> padding mask -> megatron-core's
vocab-parallel cross-entropy): per-token loss, every parameter's gradient and the encoder
output's gradient, at TP=1, TP=2 and TP=2 with sequence parallelism on gloo, with the Gemma-2
cap and with none. Tolerance: float32, different reduction order; 1e-5 absolute (as
tests/parallel/test_gemma2_tp.py)."""

import dataclasses
import types

import pytest
import torch

from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
from mmcap.testing import DistributedWorkers

WORLD = 2
B, S, SE = 2, 8, 5


def _unfused_head_loss(self, hidden, labels, weight):
    """decoder_base._head's loss branch before the fused op (verbatim logic)."""
    from mmcap.model.decoder_base import IGNORE_INDEX

    logits, _ = self.output_layer(hidden, weight=weight)
    cap = self.decoder_config.final_logit_softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    logits = self._mask_vocab_padding(logits)
    ignore = labels == IGNORE_INDEX
    loss = self.compute_language_model_loss(labels.masked_fill(ignore, 0), logits)
    return loss.masked_fill(ignore, 0.0)


def _case(tp: int, sp: bool, cap, strategy: str | None = None):
    """``strategy``: None = the CPU dispatch (softcap_ce_ref); "forward" / "recompute" = the
    tiled op's autograd path with that gradient strategy (what CUDA runs)."""
    import os

    env = {"MMCAP_FUSED_OPS_ON_CPU": "1", "MMCAP_SOFTCAP_CE_GRAD": strategy} if strategy else {}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_case(tp, sp, cap)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _run_case(tp: int, sp: bool, cap):
    from mmcap.model.build import build_gemma2_decoder
    from mmcap.model.decoder_base import IGNORE_INDEX
    from mmcap.parallel import initialize_model_parallel
    from mmcap.parallel.tp import allreduce_sequence_parallel_grads, full_grads

    # vocab 1000 -> padded to 1024 x TP: the last TP rank holds padding rows.
    dec = dataclasses.replace(get_preset("debug-gemma").decoder, final_logit_softcap=cap)
    initialize_model_parallel(ParallelConfig(tensor_parallel=tp, sequence_parallel=sp), seed=7)
    model = build_gemma2_decoder(
        dec, ParallelConfig(tensor_parallel=tp, sequence_parallel=sp), PrecisionConfig("fp32")
    )
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, dec.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, dec.vocab_size, (B, S), generator=g)
    labels[0, -3:] = IGNORE_INDEX
    labels[1, 0] = dec.vocab_size - 1  # a target in the last rank's shard
    enc_full = torch.randn(SE, B, dec.encoder_hidden_size, generator=g)
    out = {}
    for path in ("fused", "unfused"):
        if path == "unfused":
            model._head_loss = types.MethodType(_unfused_head_loss, model)
        model.zero_grad(set_to_none=True)
        enc = enc_full.clone().requires_grad_(True)
        tok_loss = model(ids, enc, None, labels=labels)
        (tok_loss.sum() / (labels != IGNORE_INDEX).sum()).backward()
        allreduce_sequence_parallel_grads(model)
        out[path] = (tok_loss.detach(), full_grads(model), enc.grad)
    return out


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD, timeout=300) as w:
        yield w


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_fused_head_loss_equals_unfused(workers, tp, sp, cap):
    for result in workers.run(_case, tp, sp, cap):
        (loss, grads, enc_grad), (want_loss, want_grads, want_enc) = (
            result["fused"], result["unfused"]
        )  # fmt: skip
        assert loss.shape == (B, S) and loss.dtype == torch.float32
        assert (loss - want_loss).abs().max().item() <= 1e-5
        assert (enc_grad - want_enc).abs().max().item() <= 1e-5
        assert set(grads) == set(want_grads)
        for name, gr in want_grads.items():
            assert (grads[name] - gr).abs().max().item() <= 1e-5, name
        assert want_grads["embedding.word_embeddings.weight"].abs().max() > 0


@pytest.mark.parametrize("strategy", ["forward", "recompute"])
@pytest.mark.parametrize("tp,sp", [(2, False), (2, True)])
def test_tiled_op_path_equals_unfused(workers, tp, sp, strategy):
    """The path CUDA takes (the tiled op, each gradient strategy) inside the decoder, under
    TP and sequence parallelism: same loss and gradients as the unfused head."""
    for result in workers.run(_case, tp, sp, 30.0, strategy):
        (loss, grads, enc_grad), (want_loss, want_grads, want_enc) = (
            result["fused"], result["unfused"]
        )  # fmt: skip
        assert (loss - want_loss).abs().max().item() <= 1e-5
        assert (enc_grad - want_enc).abs().max().item() <= 1e-5
        for name, gr in want_grads.items():
            assert (grads[name] - gr).abs().max().item() <= 1e-5, name
