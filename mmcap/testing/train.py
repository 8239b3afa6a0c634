"""Run the trainer and the command-line tools IN-PROCESS on a rank of a
:class:`mmcap.testing.DistributedWorkers` pool (whose gloo world is already initialised).

Starting ``torchrun`` costs 12-16 s of interpreter start-up (torch + megatron-core imports) per
process on 2 cores; a pooled rank runs the same code path (``load_train_config`` ->
:func:`mmcap.train.loop.train`, or a tool's ``main(argv)``) in a fraction of that. Tests of
process semantics (kill -9, signals to a process group) still start real processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _captured_logs():
    """Collect INFO+ records of every logger as text (the console output a user sees)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _teardown_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def train_in_process(argv: list[str]) -> tuple[int, str]:
    """``python -m mmcap.train ARGV`` on this rank of the pool: (exit code, log text).

    Configuration errors return 2 and checkpoint errors 4, with the message in the text, as the
    CLI does."""
    from mmcap.checkpoint.integrity import CheckpointError
    from mmcap.config import ConfigError
    from mmcap.train.__main__ import config_from_args, parse_args
    from mmcap.train.checkpoint import CheckpointSaveError
    from mmcap.train.loop import train

    with _captured_logs() as buf:
        try:
            cfg = config_from_args(parse_args(argv))
            code = train(cfg)
        except ConfigError as e:
            buf.write(f"mmcap.train: configuration error: {e}\n")
            code = 2
        except (CheckpointError, CheckpointSaveError) as e:
            buf.write(f"mmcap.train: checkpoint error: {e}\n")
            code = 4
        finally:
            _teardown_model_parallel()
    return code, buf.getvalue()


def tool_in_process(name: str, argv: list[str]) -> tuple[int, str]:
    """``python tools/<name>.py ARGV`` on this rank: (exit code, stdout + stderr + logs)."""
    spec = importlib.util.spec_from_file_location(f"_mmcap_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with _captured_logs() as buf, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = module.main(argv)
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 1
        finally:
            _teardown_model_parallel()
    return int(code or 0), out.getvalue() + buf.getvalue()
