"""Tasks: what a model predicts, and everything that depends on it.

One object per task (``classification``, ``segmentation``, ``detection``), split into an objective (loss,
TRADES divergence, fooling, which images attacks run on, training accuracy) and an evaluator
(one runner's scores over a validation pass, and the task's report fields); see
:mod:`toolchain.tasks.base`. Stages, attacks and the validation engine ask the task, never
branch on its name. Tasks import nothing of the suites or attacks.
"""

from __future__ import annotations

from toolchain.tasks import classification, detection, segmentation
from toolchain.tasks.base import (
    DEFAULT_TASK,
    TASKS,
    AttackSpec,
    Evaluator,
    Objective,
    Task,
    finite_images,
    take_labels,
    task_named,
    task_of,
    to_device,
)

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "AttackSpec",
    "Evaluator",
    "Objective",
    "Task",
    "finite_images",
    "take_labels",
    "task_named",
    "task_of",
    "to_device",
]
_TASKS = (classification, detection, segmentation)
