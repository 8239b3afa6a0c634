"""Training-state checkpoints (trainer groundwork): model, optimizer, LR scheduler, sampler state,
step and consumed samples, RNG states, in megatron-core's distributed format.

Layout on disk: ``<save>/step_<N>/`` (a dist checkpoint + ``mmcap_model.json`` +
``train_state.json`` + ``inference/``: tokenizers, image size, prompts, when the run has them) and ``<save>/latest`` (a text file naming the newest complete step).
A save goes to ``step_<N>.partial`` and is renamed only when complete; ``latest`` is replaced
atomically after that, so a save killed at any point leaves the previous checkpoint as latest.
Model and optimizer state reshard to any TP/PP/DP layout (optimizer: megatron-core's
``fully_reshardable`` format); RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mmcap.checkpoint.dist import CONFIG_FILE
from mmcap.checkpoint.inference_assets import write_files
from mmcap.checkpoint.integrity import CheckpointError, write_checksums
from mmcap.checkpoint.run_dir import (  # noqa: F401 - the resume finder, re-exported
    LATEST,
    STATE_FILE,
    latest_checkpoint,
    validate_checkpoint,
)
from mmcap.config import ModelConfig
from mmcap.config.serialize import model_config_to_dict
from mmcap.parallel import cuda_factories_on_cpu
from mmcap.parallel.lifetime import checkpoint_writer_dies_with_parent

log = logging.getLogger("mmcap.train")

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
    # increments it in place once per parameter, so each state needs its own copy; the fused
    # kernel (optim.implementation) needs it on the parameter's device, in float32.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        fused = {id(p) for g in opt.optimizer.param_groups if g.get("fused") for p in g["params"]}
        for param, state in opt.optimizer.state.items():
            if "step" in state and torch.is_tensor(state["step"]):
                step = state["step"]
                if id(param) in fused:
                    state["step"] = step.to(param.device, torch.float32, copy=True)
                else:
                    state["step"] = step.clone()


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


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; nothing was left behind (the previous ``latest`` stands)."""


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def _agree(failed: bool | torch.Tensor) -> bool:
    """True on every rank if any rank failed (one all-reduce, one host read); ``failed`` may
    be a bool tensor on the device, read only after the all-reduce."""
    if not dist.is_initialized():
        return bool(failed)
    if isinstance(failed, torch.Tensor):
        flag = failed.reshape(1).to(torch.float32)
    else:
        flag = torch.tensor([float(failed)], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded")


def _disk_full(err: BaseException | None, root: Path) -> str | None:
    """Why the save probably failed for lack of room, or None. megatron-core's writer
    processes lose the errno (the failure comes back as a text), so this also looks at the
    text, the file-size limit and the free space."""
    e = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.strerror
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return next(t for t in _DISK_FULL_TEXT if t in str(e))
        e = e.__cause__ or e.__context__
    if err is None:
        return None
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"a file-size limit (ulimit -f) of {soft} bytes is set"
    free = shutil.disk_usage(root).free
    if free < 1 << 30:
        return f"{free >> 20} MiB free on the disk of {root}"
    return None


def _save_error(final: Path, err: BaseException | None) -> CheckpointSaveError:
    full = _disk_full(err, final.parent)
    if full is not None:
        return CheckpointSaveError(
            f"saving {final} failed: the disk, the quota or the file-size limit is full "
            f"({full}). Free space (or raise the limit) and resume from the previous "
            "checkpoint (--resume auto); nothing of this save was kept."
        )
    text = f"{type(err).__name__}: {err}"[:2000] if err is not None else ""
    where = f" on this rank: {text}" if err is not None else " on another rank"
    return CheckpointSaveError(
        f"saving {final} failed{where}. The previous checkpoint stays 'latest'; nothing of this "
        "save was kept."
    )


def weights_are_finite(chunks) -> bool:
    """Every model parameter finite on every rank (collective; one host read, not one per
    parameter)."""
    finite = [torch.isfinite(p).all() for c in chunks for p in _unwrap(c).parameters()]
    if not finite:
        return not _agree(False)
    return not _agree(~torch.stack(finite).all())


def save_train_state(
    save_dir: str | os.PathLike,
    step: int,
    chunks,
    optimizer,
    scheduler,
    model_config: ModelConfig,
    extra: dict | None = None,
    extra_files: dict | None = None,
) -> Path:
    """Collective save of step ``step``; returns the checkpoint directory.

    Everything goes to ``step_N.partial``: the shards (every rank), then (rank 0)
    ``mmcap_model.json``, ``train_state.json`` and, last, the checksums of every file; only
    then is it renamed to ``step_N`` and ``latest`` replaced. A failure on ANY rank (disk full,
    file-size limit, I/O error) is seen by every rank: the partial directory is removed and
    every rank raises :class:`CheckpointSaveError`.

    Args:
        chunks: the (DDP-wrapped) model chunks of this rank.
        optimizer / scheduler: megatron-core optimizer and OptimizerParamScheduler.
        extra: JSON-able state that is the same on every rank (sampler state, consumed
            samples, ...), stored in ``train_state.json``.
        extra_files: {relative path: source Path or bytes} written by rank 0 into the step
            directory before the checksums (the ``inference/`` folder:
            :mod:`mmcap.checkpoint.inference_assets`).
    """
    root = Path(save_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    err: BaseException | None = None
    try:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
    except OSError as e:
        err = e
    if not _agree(err is not None):
        checkpoint_writer_dies_with_parent()  # megatron-core's writer server, if it starts one
        try:
            with cuda_factories_on_cpu():
                dist_checkpointing.save(
                    _sharded_state(chunks, optimizer, is_loading=False), str(partial)
                )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - torch DCP's CheckpointException is one
            err = e
    if not _agree(err is not None) and rank0:
        try:
            info = {"model": model_config_to_dict(model_config), "metadata": {"step": step}}
            (partial / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
            state = {
                "step": step,
                "layout": list(_layout()),
                "scheduler": scheduler.state_dict(),
                **(extra or {}),
            }
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            write_files(partial, extra_files or {})
            write_checksums(partial)  # last: a checkpoint with checksums is complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = root / f".{LATEST}.tmp"
            tmp.write_text(final.name)
            if (root / LATEST).is_dir() and not (root / LATEST).is_symlink():
                log.warning("%s is a directory, not the pointer file: replacing it", root / LATEST)
                shutil.rmtree(root / LATEST)
            os.replace(tmp, root / LATEST)
        except OSError as e:
            err = e
    if _agree(err is not None):
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
            (root / f".{LATEST}.tmp").unlink(missing_ok=True)
        raise _save_error(final, err)
    return final


def load_train_state(ckpt: str | os.PathLike, chunks, optimizer, scheduler) -> dict:
    """Collective load into this rank's chunks / optimizer / scheduler (any layout).

    Returns the ``train_state.json`` dict (step, sampler state, ...). RNG states are restored
    when the checkpoint was saved with the same TP/PP/DP layout, else left as seeded.
    """
    from mmcap.checkpoint.integrity import check_fits

    ckpt = Path(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    same_layout = tuple(state["layout"]) == _layout()
    model_sd = {f"m{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
    check_fits(model_sd, ckpt, getattr(_unwrap(chunks[0]), "model_config", None))
    sharded = _sharded_state(chunks, optimizer, is_loading=True)
    if not same_layout:
        sharded.pop("rng_state")
    try:
        with cuda_factories_on_cpu():
            loaded = dist_checkpointing.load(sharded, str(ckpt))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as any reader error
        raise CheckpointError(f"{ckpt}: could not be read ({type(e).__name__}: {e})") from e
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
