"""Evaluation: teacher-forced cross-entropy per sample, per task-language key and per split,
with the official CE eval's lengths and the paper's compute report."""

from mmcap.eval.compute import TrainingRun, compute_report, resolve_training_run
from mmcap.eval.lengths import SequenceTooLongError, check_position_limits, eval_batch_config
from mmcap.eval.loss import evaluate_loss, plan_microbatches
from mmcap.eval.results import SPLITS, EvalResult, SampleLoss, aggregate, write_results
from mmcap.eval.runner import build_eval_model, run_eval_loss

__all__ = [
    "SPLITS",
    "EvalResult",
    "SampleLoss",
    "SequenceTooLongError",
    "TrainingRun",
    "aggregate",
    "build_eval_model",
    "check_position_limits",
    "compute_report",
    "eval_batch_config",
    "evaluate_loss",
    "plan_microbatches",
    "resolve_training_run",
    "run_eval_loss",
    "write_results",
]
