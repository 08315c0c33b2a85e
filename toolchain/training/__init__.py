"""Training: one loop (with hooks for pruning methods) and its losses."""

from toolchain.training.checkpoint import TrainCheckpoint
from toolchain.training.loops import Step, TrainHooks, evaluate_accuracy, make_loader, train_model

__all__ = ["Step", "TrainCheckpoint", "TrainHooks", "evaluate_accuracy", "make_loader", "train_model"]
