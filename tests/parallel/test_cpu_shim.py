"""The megatron-core CPU shim and the multi-process test helper."""

import pytest
import torch

from mmcap.testing import DistributedWorkers


def test_rng_tracker_forks_on_cpu(single_rank_parallel_state):
    """model_parallel_cuda_manual_seed ran in initialize_model_parallel; fork() must swap to the
    tracked stream and restore the default one afterwards."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced


def test_cuda_factories_redirect():
    from mmcap.parallel import cuda_factories_on_cpu

    with cuda_factories_on_cpu():
        t = torch.zeros(2, device="cuda")
        u = torch.ones(1).to("cuda")
    assert t.device.type == "cpu" and u.device.type == "cpu"


def _rank_and_sum(x):
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + x)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on purpose")
    return "ok"


def _train_mode_dropout_tp2():
    """Attention dropout inside TP regions runs under the forked model-parallel RNG."""
    import dataclasses

    from mmcap.config import ParallelConfig, PrecisionConfig, get_preset
    from mmcap.model.build import build_gemma2_decoder
    from mmcap.parallel import initialize_model_parallel

    dec = dataclasses.replace(get_preset("debug-gemma").decoder, attention_dropout=0.5, dropout=0.1)
    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    initialize_model_parallel(parallel, seed=5)
    model = build_gemma2_decoder(dec, parallel, PrecisionConfig("fp32")).train()
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, torch.randn(3, 2, 64), labels=ids).mean()
    loss.backward()
    return loss.item()


def test_workers_run_collect_and_report_failures():
    with DistributedWorkers(2, timeout=120) as w:
        assert w.run(_rank_and_sum, 10) == [(0, 21.0), (1, 21.0)]
        with pytest.raises(AssertionError, match=r"failed on ranks \[1\][\s\S]*boom on purpose"):
            w.run(_fail_on_rank1)
        # The pool survives a failed call.
        losses = w.run(_train_mode_dropout_tp2)
        assert (
            losses[0] == losses[1] and losses[0] == losses[0]
        )  # same loss on both TP ranks, not NaN
