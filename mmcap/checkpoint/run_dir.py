"""Run directories: ``<save>/step_<N>/`` checkpoints and the ``latest`` pointer, and which
checkpoint a run (or a tool given a run directory) continues from."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mmcap.checkpoint.integrity import CheckpointError, skip_verification, verify_checksums

log = logging.getLogger("mmcap.train")

LATEST = "latest"
STATE_FILE = "train_state.json"


def validate_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """``path`` if it is a complete, undamaged training checkpoint, else CheckpointError naming
    the file (checksums verified unless ``verify`` is False or MMCAP_SKIP_CHECKSUMS=1; file
    sizes are always checked)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({e})") from None
    verify_checksums(path, full=verify and not skip_verification())
    return path


def _step_dirs(root: Path) -> list[Path]:
    """``step_N`` directories (not ``.partial``), newest first."""
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(save_dir: str | os.PathLike, verify: bool = True) -> Path | None:
    """The checkpoint a run continues from (``--resume auto``): the newest complete, undamaged
    ``step_N`` of ``save_dir``, which ``latest`` normally names.

    - A damaged newest checkpoint (truncated or changed file, broken ``train_state.json``)
      falls back to the previous complete one, with a warning naming the file.
    - A missing, empty or non-file ``latest`` with step directories present resumes from the
      newest complete one (saying so): never a fresh start over a run's checkpoints.
    - None only when ``save_dir`` holds no step directory; CheckpointError when it holds some
      and none is usable.
    """
    root = Path(save_dir)
    marker = root / LATEST
    named = None
    if marker.is_file():
        try:
            named = marker.read_text().strip() or None
        except OSError:  # unreadable: treated as missing, and the warning below says so
            named = None
    steps = _step_dirs(root)
    if not steps:
        if named is not None:
            raise CheckpointError(f"{marker} names {named}, but {root} holds no step_* checkpoint")
        return None
    problems = []
    for path in steps:
        try:
            validate_checkpoint(path, verify)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        if path.name != named:
            what = f"names {named}" if named else "is missing, empty or not a file"
            log.warning("%s %s; resuming from the newest complete checkpoint %s", marker, what, path)
        return path
    raise CheckpointError(
        f"{root} holds {len(steps)} checkpoint(s) and none is usable ({'; '.join(problems)}). "
        "Refusing to start over them: repair or move them, or give another checkpoint.save."
    )
