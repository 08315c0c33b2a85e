"""Tasks: what a model predicts, and everything that depends on it.

One object per task (``classification``, ``segmentation``) owns the training loss, the
accuracy counted during training, what "fooled" means for an attack's restarts, the shape a
model must return, which recipe settings apply, the validation suite and which numbers the
corruption errors are computed on. Stages and libraries ask the task, never branch on its name:
a model carries its task in its spec (:func:`task_of`), a dataset in its bundle, a recipe in
its ``task`` key, an evaluation in its ``task`` field.

Light to import (torch only); the suites are imported when a task evaluates.
"""

from __future__ import annotations

from toolchain.tasks import classification, segmentation
from toolchain.tasks.base import DEFAULT_TASK, TASKS, Task, task_named, task_of

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "task_named", "task_of"]
_TASKS = (classification, segmentation)
