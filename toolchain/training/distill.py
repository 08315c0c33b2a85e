"""Robust distillation from the dense model: the frozen teacher and the ARD and RSLAD losses.

A pruned model is fine-tuned next to the dense model it came from, so the dense model's
robust predictions are there to learn from. KL terms are the task's
:meth:`~toolchain.tasks.Task.divergence`, ``KL(p(teacher) || p(student))``: per image for
classification, per labelled pixel for segmentation.

* ARD (Goldblum et al. 2020, "Adversarially Robust Distillation"; official code
  github.com/goldblum/AdversariallyRobustDistillation): the student is attacked on its own
  cross-entropy with the hard labels (the recipe's PGD), and on those examples matched to the
  teacher's temperature-softened prediction on the *clean* input::

      w * T^2 * KL(t(x) / T || s(x_adv) / T) + (1 - w) * CE(s(x), y)

  The official code defaults to ``T = 30`` and ``w = 1`` (no clean term) on CIFAR-10.

* RSLAD (Zi et al. 2021, "Revisiting Adversarial Robustness Distillation: Robust Soft Labels
  Make Student Better"; official code github.com/zibojia/RSLAD): the teacher's soft labels on
  the clean input replace the hard labels everywhere. The examples maximise
  ``KL(t(x) || s(x'))`` from ``x + 0.001 * N(0, 1)`` (TRADES' inner step with the teacher as the
  reference), and the loss is::

      w * T^2 * KL(t(x) / T || s(x_adv) / T) + (1 - w) * T^2 * KL(t(x) / T || s(x) / T)

  The paper uses ``w = 5/6`` and ``T = 1``.
* Corruption consistency (ours, for either): ``+ c * T^2 * KL(t(x_c) / T || s(x_c) / T)`` on a
  copy ``x_c`` of the batch with a random corruption per image, so the student also follows
  the dense model where the road is foggy, dark or blurred.

Deviation from both official codes: their ``nn.KLDivLoss`` averages over classes as well as
images (a factor ``1 / num_classes``); ours is the KL per image (per pixel), as TRADES' term
here, so ``w`` and ``c`` weigh quantities on the scale of the cross-entropy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.tasks import task_of

#: The training losses that need the dense model as a teacher.
DISTILL_LOSSES = ("ard", "rslad")


class Teacher:
    """A frozen snapshot of the dense model on the training device.

    The copy is in eval mode (BatchNorm uses its running statistics and never updates them)
    with no parameter requiring gradients, and is called under ``no_grad``: nothing the
    student's training does reaches it, and the caller's model is never touched.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        task = task_of(model)
        if task.name not in ("classification", "segmentation"):
            raise UserError(
                f"train.loss ard/rslad distil per image or per pixel; a {task.name} model has no such "
                "soft labels: use loss pgd, hybrid or trades"
            )
        self.model = copy.deepcopy(model).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Any:
        self.model.eval()
        return self.model(x)


def soft_divergence(student: Any, teacher: Any, y: Any, model: nn.Module, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p(teacher / T) || p(student / T))``, reduced as the task's divergence (mean
    over images, or over labelled pixels). ``T^2`` keeps the gradient's scale as ``T`` grows
    (Hinton et al. 2015). Outputs are logit tensors (:class:`Teacher` refuses other tasks)."""
    t = temperature
    return task_of(model).divergence(student / t, teacher.detach() / t, y) * (t * t)
