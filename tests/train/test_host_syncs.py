"""Host synchronisations of a training step, counted on CPU (issue 13, item 6).

- budget: one trainer step (:func:`mmcap.train.loop.run_step` and the loop's validation /
  checkpoint checks) of the debug model makes at most :data:`SYNC_BUDGET` reads of mmcap's own
  that would block the host on CUDA (:class:`mmcap.testing.syncs.HostSyncCounter`), on one
  rank and on PP=2 x DP=2; megatron-core's reads (found-inf, the total grad norm, the per-token
  loss scaling) are counted apart, at most :data:`MEGATRON_SYNC_BUDGET` (no read per gradient:
  :mod:`mmcap.parallel.multi_tensor`);
- semantics: :func:`reduce_step_stats`'s one world all-reduce gives what the former DP / PP /
  world reductions gave (loss and per-key sums of the last stage over DP, counts over DP,
  decode failures / TP and signals over the world, elapsed minutes max) for TP2xDP2, PP2xDP2,
  TP2xPP2;
- the counter itself, :func:`mmcap.train.data.to_device`'s non_blocking copies, and
  ``BatchSource.next``'s device branch ("meta" standing in for the GPU: padded / packed, host /
  GPU-decoded pixels), the only part of the CUDA copy path a CPU machine can run.
"""

import dataclasses
import os
import time

import pytest
import torch

from mmcap.testing import DistributedWorkers
from mmcap.testing.syncs import HostSyncCounter

# The loss / skip decision needs the global loss on the host before the optimizer step: one
# read. Everything else of the step is reduced with it (mmcap/train/step_stats.py).
SYNC_BUDGET = 1
# megatron-core's own reads: the token count's ``> 0`` (finalize_model_grads), found-inf and the
# total gradient norm. Its local grad-norm fallback read every gradient's norm as well (49 more
# on this model; mmcap.parallel.multi_tensor replaces it). Not counted: the RNG tracker's
# comparison of CPU generator states (tensor_parallel/random.py), host tensors on CUDA too.
MEGATRON_SYNC_BUDGET = 3
_HOST_ONLY_SITES = ("megatron/core/tensor_parallel/random.py:",)


@pytest.fixture(scope="module")
def world4():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmcap.data.testing import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "train", 32, seed=3, prompt_vocab=1000, target_vocab=1000
    )


def _count_steps(dataset, save, extra):
    """Two trainer steps on this rank; the second (the first builds optimizer state) counted.
    Returns (mmcap's reads, megatron-core's reads, the table, consumed samples)."""
    from megatron.core import parallel_state

    from mmcap.train.__main__ import config_from_args, parse_args
    from mmcap.train.builder import build_trainer
    from mmcap.train.loop import StopConditions, run_step
    from mmcap.train.state import TrainState

    # The fused ops' path, the one CUDA takes (the plain-autograd CE reference checks the
    # labels with a host read: "the reference runs on CPU").
    os.environ["MMCAP_FUSED_OPS_ON_CPU"] = "1"
    args = [
        "--preset", "debug-gemma", f"data.train=[{dataset}]",
        "data.batch.max_prompt_tokens=24", "data.batch.max_target_tokens=24",
        "data.num_workers=0", f"checkpoint.save={save}", "checkpoint.save_interval=100",
        "train_steps=10", "global_batch_size=8", "micro_batch_size=2",
        "precision.params_dtype=fp32", "optim.lr=1e-3", "logging.log_interval=5",
        "logging.tensorboard_dir=", *extra,
    ]  # fmt: skip
    try:
        cfg = config_from_args(parse_args(args))
        t = build_trainer(cfg)
        state = TrainState(sampler=t.data.state_dict())
        stop = StopConditions(cfg)
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                mbs, batch = t.data.next()  # host data and the (non_blocking) copy
                with HostSyncCounter() as counter:
                    event = run_step(t, state, stop, mbs, batch, t0, 0.0)
                    t.validator.due(state.step, state.step == cfg.train_steps)
                    t.checkpointer.maybe_save(state, "interval")
                assert event is None, event
        finally:
            stop.restore()
            t.data.close()
            t.logger.close()
    finally:
        os.environ.pop("MMCAP_FUSED_OPS_ON_CPU")
        parallel_state.destroy_model_parallel()
    megatron = [s for s in counter.syncs if s.owner == "megatron.core"]
    return (
        counter.count("mmcap"),
        sum(1 for s in megatron if not s.site.startswith(_HOST_ONLY_SITES)),
        counter.table(),
        state.consumed_samples,
    )


@pytest.mark.parametrize(
    "layout",
    [
        ("one rank", ["exit_duration_minutes=1000"]),
        ("PP=2 x DP=2", ["parallel.pipeline_parallel=2"]),
    ],
    ids=lambda x: x[0],
)
def test_training_step_stays_within_the_sync_budget(world1, world4, dataset, tmp_path, layout):
    name, extra = layout
    pool = world1 if name == "one rank" else world4
    results = pool.run(_count_steps, str(dataset), str(tmp_path / "save"), extra)
    for rank, (mine, megatron, table, consumed) in enumerate(results):
        print(f"{name} rank {rank}: mmcap {mine}, megatron-core {megatron}\n{table}")
        assert consumed == 16, consumed  # the counts went through the one reduction
        assert mine <= SYNC_BUDGET, f"rank {rank}: {mine} host syncs of mmcap's own\n{table}"
        assert megatron <= MEGATRON_SYNC_BUDGET, f"rank {rank}: {megatron} megatron-core\n{table}"


def _reduce(layout: dict, seed: int, flag_rank: int | None = None):
    """reduce_step_stats on this rank of a layout, with values that differ per replica / rank,
    and the expected values from the rules of the former reductions (computed the same on
    every rank from the rank grid). ``flag_rank``: that rank holds a softcap_ce gradient-check
    flag (as the forward-gradient strategy's backward leaves it on CUDA)."""
    from megatron.core import parallel_state as ps

    from mmcap.config import ParallelConfig
    from mmcap.data.prompts import ALL_KEYS
    from mmcap.parallel import initialize_model_parallel
    from mmcap.train.step_stats import HostStats, reduce_step_stats

    initialize_model_parallel(ParallelConfig(**layout), seed=None)
    try:
        k = len(ALL_KEYS)
        dp, tp = ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        first = ps.is_pipeline_first_stage(ignore_virtual=True)
        world = torch.distributed.get_world_size()
        dp_size = ps.get_data_parallel_world_size()
        tp_size = ps.get_tensor_model_parallel_world_size()

        def replica_losses(d):  # two micro-batches, the same on every TP rank of replica d
            g = torch.Generator().manual_seed(seed + d)
            out = []
            for _ in range(2):
                key = torch.zeros(k, 2)
                key[d % k] = torch.tensor([torch.rand(1, generator=g).item() * 9, 3.0])
                out.append({"lm loss": key.sum(0), "key loss": key})
            return out

        def counts(d):
            c = [4.0, 3.0, 1e12 + d, 40.0 + d, 64.0, 30.0, 48.0]
            return torch.tensor(c, dtype=torch.float64)

        host = HostStats(
            counts=counts(dp),
            decode_failures=(dp + 1) if first else 0,  # every TP rank of a replica decodes
            signalled=torch.distributed.get_rank() == world - 2,
            start_time=time.time() - 60.0 * (1 + torch.distributed.get_rank()),
        )
        if torch.distributed.get_rank() == flag_rank:
            from mmcap.ops import softcap_ce_fwdgrad

            softcap_ce_fwdgrad._PENDING[torch.device("cpu")] = torch.tensor(True)
        got = reduce_step_stats(replica_losses(dp) if last else [], host, torch.device("cpu"))
        def replica_sum(d, name):  # as before: float32 over micro-batches, then float64
            return torch.stack([x[name] for x in replica_losses(d)]).sum(0).double()

        lm = sum(replica_sum(d, "lm loss") for d in range(dp_size))
        key = sum(replica_sum(d, "key loss") for d in range(dp_size))
        c = sum(counts(d) for d in range(dp_size)).tolist()
        want = {
            "loss": (lm[0] / lm[1]).item(),
            "tokens": int(lm[1]),
            "key_loss": {
                n: (key[i, 0] / key[i, 1]).item() for i, n in enumerate(ALL_KEYS) if key[i, 1] > 0
            },
            "samples": c[0],
            "images": c[1],
            "flops": c[2],
            "useful": (c[3] / c[4], c[5] / c[6]),
            "decode_failures": sum(d + 1 for d in range(dp_size)),
            "signalled": True,
            "loss_grad_mismatch": flag_rank is not None,
        }
        assert tp_size * dp_size * ps.get_pipeline_model_parallel_world_size() == world
        return dataclasses.asdict(got), want, tp
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize(
    "layout",
    [
        {"tensor_parallel": 2},
        {"pipeline_parallel": 2},
        {"tensor_parallel": 2, "pipeline_parallel": 2},
    ],
    ids=["TP2xDP2", "PP2xDP2", "TP2xPP2"],
)
def test_one_reduction_keeps_the_semantics(world4, layout):
    results = world4.run(_reduce, layout, 11)
    for got, want, _ in results:
        elapsed = got.pop("elapsed_minutes")
        assert got == want  # bit for bit: the zeros other ranks add change no sum
        # The maximum over ranks: the last rank started 4 "minutes" ago.
        assert 4.0 <= elapsed < 4.5, elapsed
    assert all(r[0] == results[0][0] for r in results)  # every rank the same


def test_counter_counts_what_blocks_the_host_on_cuda():
    x = torch.arange(6.0)
    with HostSyncCounter() as c:
        x.sum().item()
        x.tolist()
        bool(x.any())
        float(x[0])
        x.cpu()
        x.to("cpu")
        x.nonzero()
        x[x > 2]
        torch.tensor([1.0], device="cpu")  # a host value made into a device tensor
        _ = f"{x[1]:.2f}"
        torch.tensor([x.sum(), x.max()])  # device scalars, read one by one
    assert [s.kind for s in c.syncs] == [
        "item", "tolist", "__bool__", "__float__", "cpu", "to", "nonzero", "__getitem__",
        "tensor", "__format__", "tensor", "tensor",
    ]  # fmt: skip
    assert {s.owner for s in c.syncs} == {"other"}  # called from tests/, not mmcap
    with HostSyncCounter() as c:
        x.numpy()  # raises on a CUDA tensor: never a hidden sync
        x.to("cpu", non_blocking=True)
        torch.tensor([1.0])  # host tensor
        x[1:3] * 2 + x.sum()
        x.to(torch.float64)
    assert c.syncs == []


def test_counter_names_mmcap_call_sites():
    """Reads inside mmcap count as mmcap's, at their line: the save's finite-weights check
    reads one flag for the whole model (it read one per parameter)."""
    from mmcap.train.checkpoint import weights_are_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    with HostSyncCounter() as c:
        assert weights_are_finite([model])
        model[1].bias.data[0] = float("nan")
        assert not weights_are_finite([model])
    assert c.count() == c.count("mmcap") == 2, c.table()
    assert all(s.site.startswith("mmcap/train/checkpoint.py:") for s in c.syncs)


def test_to_device_copies_non_blocking_and_keeps_device_tensors():
    from mmcap.model.stage_io import MicroBatch, PackedDocs
    from mmcap.train.data import to_device

    docs = PackedDocs(
        encoder_doc=torch.zeros(1, 4, dtype=torch.int32),
        decoder_doc=torch.zeros(1, 3, dtype=torch.int32),
        encoder_pos=torch.arange(4)[None],
        decoder_pos=torch.arange(3)[None],
        image_index=None,
    )
    on_target = torch.empty(1, 3, 8, 8, device="meta")  # already there: kept as is
    mb = MicroBatch(
        prompt_ids=torch.ones(1, 4, dtype=torch.long),
        prompt_mask=torch.ones(1, 4, dtype=torch.bool),
        decoder_input_ids=torch.ones(1, 3, dtype=torch.long),
        labels=torch.ones(1, 3, dtype=torch.long),
        pixel_values=on_target,
        num_image_tokens=5,
        key=torch.zeros(1, 3, dtype=torch.long),
        packed=docs,
    )
    calls = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "to":
                calls.append(kwargs.get("non_blocking"))
            return func(*args, **(kwargs or {}))

    with Record():
        out = to_device(mb, "meta", pin=False)  # "meta" stands for the GPU on a CPU machine
    assert calls == [True] * 9  # 4 token tensors + key + 4 packed-doc tensors
    assert out.pixel_values is on_target and out.num_image_tokens == 5
    assert out.packed.image_index is None and out.packed.encoder_pos.device.type == "meta"
    assert all(
        getattr(out, f).device.type == "meta"
        for f in ("prompt_ids", "prompt_mask", "decoder_input_ids", "labels", "key")
    )
    host = dataclasses.replace(mb, pixel_values=torch.zeros(1, 3, 8, 8))
    cpu = to_device(host, "cpu")  # the CPU trainer: nothing moves, nothing is pinned
    assert cpu.prompt_ids is mb.prompt_ids and cpu.packed.encoder_doc is docs.encoder_doc
    assert cpu.pixel_values is host.pixel_values


def test_exit_duration_takes_the_reduced_elapsed_minutes():
    """``exit_duration_minutes`` decides on the elapsed time of the step's reduction (the
    maximum over ranks), no longer on an all-reduce of its own."""
    from mmcap.train.__main__ import config_from_args, parse_args
    from mmcap.train.loop import StopConditions
    from mmcap.train.state import TrainState

    cfg = config_from_args(
        parse_args(["--preset", "debug-gemma", "exit_duration_minutes=2", "train_steps=10"])
    )
    stop = StopConditions(cfg)
    try:
        state = TrainState(sampler={})
        state.step = 3
        assert stop.check(state, False, 1.9) is None
        assert stop.check(state, False, 2.0) == "exit"
        assert stop.check(state, True, 0.0) == "signal"
        state.step = 10  # the last step ends the run, not the duration
        assert stop.check(state, False, 5.0) is None
        with pytest.raises(ValueError, match="elapsed_minutes"):
            stop.check(TrainState(sampler={}), False)
    finally:
        stop.restore()


def _fields(mb):
    out = {}
    for f in dataclasses.fields(mb):
        v = getattr(mb, f.name)
        if dataclasses.is_dataclass(v):
            out.update({f"{f.name}.{k}": x for k, x in _fields(v).items()})
        else:
            out[f.name] = v
    return out


@pytest.mark.parametrize("pixels_on_device", [False, True], ids=["host pixels", "GPU pixels"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_batch_source_copies_micro_batches_to_the_device(
    dataset, monkeypatch, packing, pixels_on_device
):
    """BatchSource.next's device branch on a CPU machine ("meta" stands for the GPU): the
    micro-batches equal the CPU ones field by field (shape, dtype) and every tensor is on the
    device; pixels decoded on the device are used in place."""
    from mmcap.train import data as train_data
    from mmcap.train.__main__ import config_from_args, parse_args

    cfg = config_from_args(
        parse_args(
            [
                "--preset", "debug-gemma", f"data.train=[{dataset}]", "data.num_workers=0",
                "data.batch.max_prompt_tokens=24", "data.batch.max_target_tokens=24",
                "global_batch_size=8", "micro_batch_size=2", f"data.packing={packing}",
            ]
        )
    )  # fmt: skip

    def source():
        return train_data.BatchSource(
            cfg, cfg.model_config(), needs_pixels=True, dp_rank=0, dp_size=1
        )

    ref_mbs, _ = source().next()
    assert any(mb.pixel_values is not None for mb in ref_mbs)  # the pixel paths are exercised
    monkeypatch.setattr(train_data, "current_device", lambda: torch.device("meta"))
    src = source()
    if pixels_on_device:
        it = src._iterator()

        def on_device():
            for batch in it:
                batch.pixels = batch.pixels.to("meta")
                yield batch

        src._it = on_device()
    mbs, _ = src.next()
    assert len(mbs) == len(ref_mbs)
    for mb, ref in zip(mbs, ref_mbs):
        got, want = _fields(mb), _fields(ref)
        assert got.keys() == want.keys()
        for name, w in want.items():
            g = got[name]
            if isinstance(w, torch.Tensor):
                assert g.device.type == "meta", name
                assert (g.shape, g.dtype) == (w.shape, w.dtype), name
            else:
                assert g == w, name


def test_loss_gradient_check_reaches_every_rank(world4):
    """A non-uniform-gradient flag held on one rank (softcap_ce's forward-gradient strategy)
    travels in the step's one reduction: every rank sees it; it is consumed."""
    for flag_rank in (1, None):
        for got, want, _ in world4.run(_reduce, {"pipeline_parallel": 2}, 3, flag_rank):
            got.pop("elapsed_minutes")
            assert got == want and got["loss_grad_mismatch"] == (flag_rank is not None)


def test_train_step_stops_before_the_update_on_a_flagged_gradient(monkeypatch):
    """The flag stops the step with the op's message before the optimizer can apply a wrong
    LM-head gradient."""
    from types import SimpleNamespace

    import mmcap.train.step as step
    from mmcap.train.step_stats import StepStats

    def stats(flag):
        return StepStats(loss=1.0, tokens=4, key_loss={}, loss_grad_mismatch=flag)

    class Optimizer:
        param_groups = [{"lr": 1e-3}]
        stepped = 0

        def zero_grad(self):
            pass

        def step(self):
            self.stepped += 1
            return True, 1.0, None

    chunk = SimpleNamespace(zero_grad_buffer=lambda: None)
    monkeypatch.setattr(step, "run_schedule", lambda *a, **k: [])
    monkeypatch.setattr(step, "current_device", lambda: torch.device("cpu"))
    for flag in (False, True):
        monkeypatch.setattr(step, "reduce_step_stats", lambda *a, flag=flag: stats(flag))
        opt = Optimizer()
        if flag:
            with pytest.raises(RuntimeError, match="MMCAP_SOFTCAP_CE_GRAD=recompute"):
                step.train_step([chunk], opt, [object()], encoder_hidden=8)
        else:
            step.train_step([chunk], opt, [object()], encoder_hidden=8)
        assert opt.stepped == (0 if flag else 1)
