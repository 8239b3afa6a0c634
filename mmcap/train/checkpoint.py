"""Training-state checkpoints (trainer groundwork): model, optimizer, LR scheduler, sampler state,
step and consumed samples, RNG states, in megatron-core's distributed format.

Layout on disk: ``<save>/step_<N>/`` (a dist checkpoint + ``mmcap_model.json`` +
``train_state.json``) and ``<save>/latest`` (a text file naming the newest complete step).
A save goes to ``step_<N>.partial`` and is renamed only when complete; ``latest`` is replaced
atomically after that, so a save killed at any point leaves the previous checkpoint as latest.
Model and optimizer state reshard to any TP/PP/DP layout (optimizer: megatron-core's
``fully_reshardable`` format); RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mmcap.checkpoint.dist import CONFIG_FILE
from mmcap.config import ModelConfig
from mmcap.config.serialize import model_config_to_dict
from mmcap.parallel import cuda_factories_on_cpu

LATEST = "latest"
STATE_FILE = "train_state.json"
OPTIM_SHARDING = "fully_reshardable"


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_object() -> ShardedObject:
    """This rank's RNG states (torch, megatron-core tracker), one object per (pp, tp, dp)."""
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tp, pp, dp = _layout()
    ranks = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), ranks, replica_id=0)


@contextlib.contextmanager
def _torch_adam_step_fix(optimizer):
    """Two megatron-core 0.16.1 bugs of the ``fully_reshardable`` load without apex/TE (torch
    Adam keeps a per-parameter ``step`` tensor in its state):

    - ``_set_main_param_and_optimizer_states`` copies into ``step`` while the loader skips it in
      the source (KeyError 'step'): copy only the keys the checkpoint provides (``step`` itself
      is restored by ``load_state_dict`` from the param groups);
    - that restore shares one tensor between all states (fixed after the load, below).
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if (
            not hasattr(opt, "_set_main_param_and_optimizer_states")
            or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        ):
            continue

        def set_states(model_param, tensors, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **_opt.optimizer.state[main_param]}
            for key, value in tensors.items():
                dst[key].copy_(value)

        patched.append((opt, opt._set_main_param_and_optimizer_states))
        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt, original in patched:
            opt._set_main_param_and_optimizer_states = original
    # The same loader puts ONE shared ``step`` tensor into every parameter's state; torch Adam
    # increments it in place once per parameter, so each state needs its own copy.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()


def _init_states_for_loading(optimizer) -> None:
    """A fresh optimizer has no Adam state yet, but megatron-core builds the sharded state dict
    of a load from the existing state: create placeholder state (a zero-gradient step; every
    value, including the fp32 main parameters, is then overwritten by the load). Uses
    DistributedOptimizer's own helper for this, as megatron-core's FSDP load path does."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if len(opt.optimizer.state) == 0 and hasattr(
            opt, "_init_optimizer_states_with_dummy_values"
        ):
            opt._init_optimizer_states_with_dummy_values()


def _sharded_state(chunks, optimizer, is_loading: bool) -> dict:
    model_sd = {}
    for i, c in enumerate(chunks):
        # The unwrapped module: the same tensor names as model-only checkpoints (DDP would
        # prefix "module."), so export and eval tools read training checkpoints directly.
        model_sd[f"model{i}" if len(chunks) > 1 else "model"] = _unwrap(c).sharded_state_dict()
    # The optimizer maps its parameters to the model's sharded tensors by walking this NESTED
    # dict (as Megatron-LM passes ``{"model0": ..., "model1": ...}``): virtual-pipeline chunks
    # share local names ("decoder.layers.0..."), so a flat merge would lose all but one chunk.
    with cuda_factories_on_cpu():
        if is_loading:
            _init_states_for_loading(optimizer)
        opt_sd = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING}
        )
    return {**model_sd, "optimizer": opt_sd, "rng_state": _rng_object()}


def save_train_state(
    save_dir: str | os.PathLike,
    step: int,
    chunks,
    optimizer,
    scheduler,
    model_config: ModelConfig,
    extra: dict | None = None,
) -> Path:
    """Collective save of step ``step``; returns the checkpoint directory.

    Args:
        chunks: the (DDP-wrapped) model chunks of this rank.
        optimizer / scheduler: megatron-core optimizer and OptimizerParamScheduler.
        extra: JSON-able state that is the same on every rank (sampler state, consumed
            samples, ...), stored in ``train_state.json``.
    """
    root = Path(save_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    with cuda_factories_on_cpu():
        dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(partial))
    dist.barrier()
    if rank0:
        info = {"model": model_config_to_dict(model_config), "metadata": {"step": step}}
        (partial / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        state = {
            "step": step,
            "layout": list(_layout()),
            "scheduler": scheduler.state_dict(),
            **(extra or {}),
        }
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
    dist.barrier()
    return final


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint under ``save_dir`` (``--resume auto``), or None."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    path = Path(save_dir) / marker.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint")
    return path


def load_train_state(ckpt: str | os.PathLike, chunks, optimizer, scheduler) -> dict:
    """Collective load into this rank's chunks / optimizer / scheduler (any layout).

    Returns the ``train_state.json`` dict (step, sampler state, ...). RNG states are restored
    when the checkpoint was saved with the same TP/PP/DP layout, else left as seeded.
    """
    ckpt = Path(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    same_layout = tuple(state["layout"]) == _layout()
    sharded = _sharded_state(chunks, optimizer, is_loading=True)
    if not same_layout:
        sharded.pop("rng_state")
    with cuda_factories_on_cpu():
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(loaded[f"model{i}" if len(chunks) > 1 else "model"], strict=True)
    with cuda_factories_on_cpu(), _torch_adam_step_fix(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    return state
