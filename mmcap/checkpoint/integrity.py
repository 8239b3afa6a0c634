"""Checkpoint integrity: a checksum of every file, written last at save and verified at load,
and the check that a checkpoint's tensors fit the model before anything is loaded.

``checksums.json`` (``{"algorithm": "blake2b-128", "files": {relative path: [size, digest]}}``)
is written by rank 0 after every rank's shards are on disk and before the directory is renamed
into place; a checkpoint without it (saved before this existed) loads without verification.
Verification reads every file once (blake2b runs at ~1 GB/s per core); set
``MMCAP_SKIP_CHECKSUMS=1`` (or ``checkpoint.verify=false`` in training) to skip it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmcap.config.errors import CheckpointError  # the one checkpoint error type

CHECKSUM_FILE = "checksums.json"
ALGORITHM = "blake2b-128"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(
        p for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE and ".tmp" not in p.name
    )


def write_checksums(ckpt_dir: str | os.PathLike) -> Path:
    """Hash every file of ``ckpt_dir`` into ``checksums.json`` (atomic write)."""
    ckpt = Path(ckpt_dir)
    files = {str(p.relative_to(ckpt)): [p.stat().st_size, _digest(p)] for p in _files(ckpt)}
    tmp = ckpt / f".{CHECKSUM_FILE}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, ckpt / CHECKSUM_FILE)
    return ckpt / CHECKSUM_FILE


def skip_verification() -> bool:
    return os.environ.get("MMCAP_SKIP_CHECKSUMS", "") not in ("", "0")


def verify_checksums(ckpt_dir: str | os.PathLike, *, full: bool = True) -> bool:
    """Raise :class:`CheckpointError` naming the first damaged file; returns False when the
    checkpoint has no checksums (an older save), True when every file matched.

    Args:
        full: also hash every file (False: sizes and presence only).
    """
    ckpt = Path(ckpt_dir)
    path = ckpt / CHECKSUM_FILE
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum list ({e})") from None
    for rel, (size, digest) in sorted(recorded.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {CHECKSUM_FILE})")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
            )
        if full and _digest(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (the file changed after the save)")
    return True


def check_fits(sharded_state_dict: dict, ckpt_dir: str | os.PathLike, model_cfg=None) -> None:
    """Collective. Compare the tensors the model expects (its sharded state dict on every rank)
    with those stored in ``ckpt_dir`` before loading: every expected tensor must exist with the same global shape.
    Extra stored tensors (e.g. decoder layers the model does not have) are an error too, so a
    4-layer checkpoint never silently loads into a 2-layer model. The message lists the
    tensors and the config fields that differ (``mmcap_model.json`` vs ``model_cfg``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    stored_model = {k: v for k, v in stored.items() if not k.startswith("optimizer.")}
    # Factories (megatron's swiglu fc1 split) store under their key; their shape is checked by
    # the load itself.
    expected = {}
    for t in nested_values(sharded_state_dict):
        if isinstance(t, ShardedTensor):
            expected[t.key] = tuple(t.global_shape)
        elif isinstance(t, ShardedTensorFactory):
            expected[t.key] = None
    # This rank holds one pipeline stage: the other stages' tensors are expected elsewhere.
    everywhere = set(expected)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(expected))
        everywhere = {k for part in parts for k in part}
    missing = sorted(k for k in expected if k not in stored_model)
    shape = sorted(
        k
        for k, want in expected.items()
        if want is not None and k in stored_model and tuple(stored_model[k].global_shape) != want
    )
    # Stored model tensors the model lacks (optimizer state and RNG are not model tensors).
    unexpected = sorted(k for k in stored_model if k not in everywhere)
    if not (missing or shape or unexpected):
        return
    parts = []
    for name, keys in (("missing", missing), ("of another shape", shape), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(
                f"{k} {tuple(stored_model[k].global_shape)} vs {expected[k]}" if name == "of another shape" else k
                for k in keys[:4]
            )
            parts.append(f"{len(keys)} tensors {name} ({shown}{', ...' if len(keys) > 4 else ''})")
    diff = _config_diff(ckpt_dir, model_cfg)
    raise CheckpointError(
        f"{ckpt_dir} does not fit the model: {'; '.join(parts)}."
        + (f" Config fields that differ (checkpoint vs model): {diff}." if diff else "")
        + " Build the model the checkpoint was saved with (same preset and model.* overrides)."
    )


def _config_diff(ckpt_dir, model_cfg) -> str:
    if model_cfg is None:
        return ""
    import dataclasses

    from mmcap.checkpoint.dist import CONFIG_FILE

    try:
        saved = json.loads((Path(ckpt_dir) / CONFIG_FILE).read_text())["model"]
    except (OSError, json.JSONDecodeError, KeyError):
        return ""
    mine = dataclasses.asdict(model_cfg)
    out = []
    for section, fields in mine.items():
        if not isinstance(fields, dict):
            continue
        for k, v in fields.items():
            s = saved.get(section, {}).get(k, v)
            if isinstance(v, tuple):
                v = list(v)
            if s != v:
                out.append(f"model.{section}.{k} {s!r} vs {v!r}")
    return ", ".join(out[:8])
