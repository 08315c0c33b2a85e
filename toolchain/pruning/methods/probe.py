"""Probing a model's robustness: the adversarial loss that sensitivity-driven methods compare."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from toolchain.recipe_train import AttackConfig
from toolchain.robustness.attacks.base import eval_mode
from toolchain.robustness.attacks.pgd import pgd_examples
from toolchain.tasks import task_of


def adversarial_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]], attack: AttackConfig) -> float:
    """Mean cross-entropy on PGD examples crafted against ``model`` as it is now (eval mode).

    Every call uses the same random starts, so two probes of the same batches differ only by
    the model.
    """
    total, seen = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    task = task_of(model)
    with eval_mode(model):
        for x, y in batches:
            x_adv = pgd_examples(model, x, y, attack, generator)
            with torch.no_grad():
                total += float(task.loss(model(x_adv), y, reduction="sum"))
            seen += len(y)
    return total / max(seen, 1)


def take(loader: Iterable[tuple[Tensor, Tensor]], count: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` batches of ``loader``, kept so every probe sees the same images."""
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) >= count:
            break
    return batches
