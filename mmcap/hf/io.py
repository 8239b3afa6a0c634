"""Reading Hugging Face model directories (config.json + safetensors shards) with errors that
name the file and tensor, and writing directories atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

# The one checkpoint error type of mmcap (mmcap checkpoints and Hugging Face directories).
from mmcap.config.errors import CheckpointError


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {model_dir} a Hugging Face model dir?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The shards named by ``model.safetensors.index.json``, or the lone safetensors file."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = [d / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors file (and no model.safetensors.index.json)")
    return files


def read_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory; a corrupt shard is reported by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
        dup = sorted(set(tensors) & set(out))
        if dup:
            raise CheckpointError(f"{f}: tensors also present in another shard: {dup[:5]}")
        out.update(tensors)
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; rename it to ``out`` only if the block succeeds.

    Nothing partial is ever left at ``out``: on error the temporary directory is removed.
    """
    final = Path(out)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another output or pass --overwrite")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
