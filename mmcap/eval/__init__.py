"""Evaluation: teacher-forced cross-entropy per sample, per task-language key and per split."""

from mmcap.eval.loss import evaluate_loss, plan_microbatches
from mmcap.eval.results import SPLITS, EvalResult, SampleLoss, aggregate, write_results
from mmcap.eval.runner import build_eval_model, run_eval_loss

__all__ = [
    "SPLITS",
    "EvalResult",
    "SampleLoss",
    "aggregate",
    "build_eval_model",
    "evaluate_loss",
    "plan_microbatches",
    "run_eval_loss",
    "write_results",
]
