"""Downstream evaluation (captioning, translation, CoMMuTE ambiguity) over the official
dataset layouts: what ``tools/eval_downstream.py`` runs. See :mod:`.runner`."""

from mmcap.eval.downstream.datasets import DatasetMissingError, Sample
from mmcap.eval.downstream.runner import DownstreamOptions, run_downstream
from mmcap.eval.downstream.tasks import ALL_TASKS, TASK_SETS, Task, select_tasks

__all__ = [
    "ALL_TASKS",
    "TASK_SETS",
    "DatasetMissingError",
    "DownstreamOptions",
    "Sample",
    "Task",
    "run_downstream",
    "select_tasks",
]
