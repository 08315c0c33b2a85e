"""Training loops: clean, PGD adversarial training (Madry) and TRADES."""

from toolchain.training.loops import evaluate_accuracy, make_loader, train_model

__all__ = ["evaluate_accuracy", "make_loader", "train_model"]
