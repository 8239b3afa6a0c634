"""Model checkpoints in megatron-core's distributed format (``dist_checkpointing``).

A checkpoint directory holds megatron-core's sharded tensors (GLOBAL names: any TP/PP layout
loads it) and ``mmcap_model.json`` (the ModelConfig plus free-form metadata). Saving is
atomic: everything is written to ``<dir>.partial`` and renamed to ``<dir>`` only when every
rank has finished, so a killed save never leaves a directory that reads as a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from mmcap.config import ModelConfig
from mmcap.config.errors import CheckpointError
from mmcap.config.serialize import model_config_from_dict, model_config_to_dict
from mmcap.parallel.lifetime import checkpoint_writer_dies_with_parent

CONFIG_FILE = "mmcap_model.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    model: torch.nn.Module,
    ckpt_dir: str | os.PathLike,
    model_config: ModelConfig,
    metadata: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Save ``model`` (this rank's stage) collectively; returns the final directory.

    Args:
        model: a module with megatron-core's ``sharded_state_dict`` (CaptioningModel).
        ckpt_dir: destination; must not exist unless ``overwrite``.
        model_config: stored as JSON next to the tensors.
        metadata: extra JSON-able facts (source checkpoint, tokenizer hashes, ...).
        extra_files: relative name -> source file, copied in before the directory appears
            (tokenizers).
    """
    final = Path(ckpt_dir)
    partial = final.with_name(final.name + ".partial")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another --out or pass overwrite")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed save
        partial.mkdir(parents=True)
    _barrier()
    checkpoint_writer_dies_with_parent()  # megatron-core's writer server, if it starts one
    dist_checkpointing.save(model.sharded_state_dict(), str(partial))
    _barrier()
    if _rank() == 0:
        info = {"model": model_config_to_dict(model_config), "metadata": metadata or {}}
        (partial / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        for name, src in (extra_files or {}).items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, partial / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    _barrier()
    return final


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a training run directory (``<save>`` with ``step_N`` and
    ``latest``): its newest usable checkpoint, as ``--resume auto`` picks it."""
    from mmcap.checkpoint.run_dir import latest_checkpoint

    p = Path(path)
    if (p / CONFIG_FILE).is_file() or not p.is_dir():
        return p
    latest = latest_checkpoint(p)
    return latest if latest is not None else p


def read_checkpoint_info(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata) of a checkpoint; a clear error if it is not one."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        hint = " (an interrupted save?)" if Path(str(ckpt_dir) + ".partial").exists() else ""
        raise FileNotFoundError(f"{ckpt_dir} is not an mmcap checkpoint: no {CONFIG_FILE}{hint}")
    try:
        info = json.loads(path.read_text())
        return model_config_from_dict(info["model"], where=str(path)), info.get("metadata", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _verify_on_rank0(ckpt_dir) -> None:
    """Checksums of every file (rank 0 reads them), the verdict on every rank (collective)."""
    from mmcap.checkpoint.integrity import skip_verification, verify_checksums

    verdict = [None]
    if _rank() == 0:
        try:
            verify_checksums(ckpt_dir, full=not skip_verification())
        except CheckpointError as e:
            verdict = [str(e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def _load(sharded: dict, ckpt_dir) -> dict:
    try:
        return dist_checkpointing.load(sharded, str(ckpt_dir))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as any reader error
        raise CheckpointError(f"{ckpt_dir}: could not be read ({type(e).__name__}: {e})") from e


def load_model_checkpoint(
    model: torch.nn.Module | list[torch.nn.Module],
    ckpt_dir: str | os.PathLike,
    strict: bool = True,
) -> None:
    """Load a checkpoint saved with any TP/PP layout into this rank's stage (collective).

    ``model`` may be the list of this rank's virtual-pipeline chunks (interleaved schedule):
    they load in ONE dist_checkpointing call, because megatron-core checks that the shards of
    every tensor cover it across the world, which one call per chunk cannot satisfy (the tied
    embedding lives in different chunks on the first and last stage). Keys ``chunk{i}`` nest
    the chunks as Megatron-LM's ``model{i}``.
    """
    from mmcap.checkpoint.integrity import check_fits

    read_checkpoint_info(ckpt_dir)  # fails early with a clear message
    _verify_on_rank0(ckpt_dir)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    chunks = [getattr(c, "module", c) for c in chunks]  # DDP-wrapped chunks
    if strict:  # a checkpoint that does not fit is an error naming tensors and config fields
        check_fits(
            {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)},
            ckpt_dir,
            getattr(chunks[0], "model_config", None),
        )
    # A training checkpoint (mmcap.train.checkpoint) also holds optimizer / RNG state: its
    # non-sharded ("common") part comes back merged into the result, so keep only our keys.
    if len(chunks) == 1:
        sharded = chunks[0].sharded_state_dict()
        state = _load(sharded, ckpt_dir)
        chunks[0].load_state_dict({k: state[k] for k in sharded}, strict=strict)
        return
    sharded = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = _load(sharded, ckpt_dir)
    for i, c in enumerate(chunks):
        c.load_state_dict({k: state[f"chunk{i}"][k] for k in sharded[f"chunk{i}"]}, strict=strict)
