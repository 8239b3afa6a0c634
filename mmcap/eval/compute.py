"""The paper's compute of a training run, written beside the CE results (``tools/eval_loss.py``).

Official definition (``src/eval_loss.py`` ``measure_model_complexity``, SYSTEM.md "Evaluation")::

    S      = training_steps * training_batch_size               samples seen
    MACs   = multiply-accumulates of ONE forward, one 224 px image, 128 prompt + 128 target
             tokens (the official script counts them with fvcore, which counts one per MAC)
    factor = 1 + P_trainable / P                                  backward relative to forward
    C      = S * MACs * factor                                    ("training_macs")

mmcap counts the forward with :func:`mmcap.train.flops.forward_flops` (matmul FLOPs, 2 per MAC;
the vision tower measured with torch's FlopCounterMode) and reports MACs = FLOPs / 2 under the
official key names, plus the FLOPs themselves (``training_flops = S * FLOPs * factor``). The
attention score matrices are counted dense (``dense_attention=True``: every (query, key) pair,
as fvcore counts the eager attention matmuls of the official model). Not counted, unlike
fvcore: norms and other element-wise work (fvcore's layer-norm handles), so mmcap's MACs are a
little lower; the vocabulary is mmcap's padded one (``DecoderConfig.padded_vocab_size``).

Parameters: total and trainable of the whole model (:func:`mmcap.model.size.count_parameters`,
tied embedding counted once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from mmcap.config import ModelConfig

log = logging.getLogger(__name__)

# Official measure_model_complexity: zeros of [1, 128] ids for prompt and target, one image at
# --training_image_size (default 224).
REPORT_IMAGE_SIZE = 224
REPORT_PROMPT_TOKENS = 128
REPORT_TARGET_TOKENS = 128
TRAIN_STATE_FILE = "train_state.json"  # mmcap.train.checkpoint.STATE_FILE, in step_<N>/
TRAIN_CONFIG_FILE = "train_config.json"  # written by mmcap.train.loop beside the step folders


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """Steps and global batch size of a training run (S = steps x batch size).

    Args:
        steps: optimizer steps taken. batch_size: samples per step over all ranks.
        source: where the numbers come from ("command line" or the files read).
    """

    steps: int
    batch_size: int
    source: str = "command line"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainingRun.{name}: must be an integer >= 0, got {v!r}")


def training_run_from_checkpoint(ckpt_dir: str | os.PathLike) -> TrainingRun:
    """Steps from ``<ckpt>/train_state.json`` (``step``) and the global batch size from the
    run's ``train_config.json`` (in the checkpoint's parent, ``global_batch_size``).

    Raises FileNotFoundError / ValueError naming the file and field that are missing.
    """
    ckpt = Path(ckpt_dir)
    state_file = ckpt / TRAIN_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{ckpt} is not a training checkpoint (no {TRAIN_STATE_FILE}); pass "
            "--training-steps and --training-batch-size"
        )
    state = json.loads(state_file.read_text())
    if not isinstance(state.get("step"), int):
        raise ValueError(f"{state_file}: field 'step' is missing or not an integer")
    config_file = ckpt.parent / TRAIN_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found (the run's config, for global_batch_size); pass "
            "--training-batch-size"
        )
    batch = json.loads(config_file.read_text()).get("global_batch_size")
    if not isinstance(batch, int):
        raise ValueError(f"{config_file}: field 'global_batch_size' is missing or not an integer")
    return TrainingRun(state["step"], batch, f"{state_file} + {config_file}")


def resolve_training_run(
    ckpt_dir: str | os.PathLike, steps: int | None = None, batch_size: int | None = None
) -> TrainingRun | None:
    """The run to report: ``steps`` and ``batch_size`` when both are given, else the training
    checkpoint's files, else None (no compute report; logged, or a warning when the checkpoint
    is a training checkpoint whose files are incomplete)."""
    if steps is not None and batch_size is not None:
        return TrainingRun(steps, batch_size)
    if steps is not None or batch_size is not None:
        raise ValueError("pass both --training-steps and --training-batch-size, or neither")
    try:
        return training_run_from_checkpoint(ckpt_dir)
    except FileNotFoundError as e:
        partial = (Path(ckpt_dir) / TRAIN_STATE_FILE).is_file()
        (log.warning if partial else log.info)("no compute report: %s", e)
        return None


def compute_report(
    model_cfg: ModelConfig,
    run: TrainingRun,
    *,
    image_size: int = REPORT_IMAGE_SIZE,
    prompt_tokens: int = REPORT_PROMPT_TOKENS,
    target_tokens: int = REPORT_TARGET_TOKENS,
) -> dict:
    """The compute report (module docstring); official key names where they exist.

    megatron-core's parallel_state must be initialised at TP = PP = 1 (parameters are counted
    on a meta-device build).
    """
    from mmcap.model.size import count_parameters
    from mmcap.train.flops import forward_flops

    cfg = dataclasses.replace(
        model_cfg, vision=dataclasses.replace(model_cfg.vision, image_size=image_size)
    )
    by_component = forward_flops(cfg, prompt_tokens, target_tokens, dense_attention=True)
    flops = sum(by_component.values())
    macs = flops / 2  # one multiply-accumulate = 2 FLOPs
    size = count_parameters(model_cfg)
    seen = run.steps * run.batch_size
    factor = 1 + size.trainable / size.total
    return {
        "training_steps": run.steps,
        "training_batch_size": run.batch_size,
        "training_run_source": run.source,
        "training_seen_samples": seen,
        "image_size": image_size,
        "prompt_tokens": prompt_tokens,
        "target_tokens": target_tokens,
        "model_flops": flops,
        "model_flops_by_component": by_component,
        "model_macs": macs,
        "model_params": size.total,
        "trainable_model_params": size.trainable,
        "forward_backward_factor": factor,
        "training_macs": seen * macs * factor,
        "training_flops": seen * flops * factor,
        "reported": "training_macs (C, the paper's official definition, MACs)",
    }
