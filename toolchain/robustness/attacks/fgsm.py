"""Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps."""

from __future__ import annotations

import torch
from torch import nn

from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """``x + eps * sign(grad_x L(f(x), y))``, clamped to [0, 1], with ``L`` the task's loss
    (cross-entropy; per pixel for segmentation).

    Deterministic and single-step (reported as one step): ``steps`` and ``seed`` have no effect;
    ``restarts`` above 1 is refused.
    """

    name = "fgsm"
    mode = "white-box"
    norms = ("linf",)
    tasks = frozenset({"classification", "segmentation", "detection"})

    def __init__(self, *, eps: float, norm: str = "linf", seed: int = 0) -> None:
        super().__init__(eps=eps, norm=norm, steps=1, seed=seed)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        with input_gradients_only(model):
            x_in = x.clone().requires_grad_(True)
            # Summed (not averaged) loss: the sign is the same, and tiny per-sample gradients
            # of a large batch do not underflow.
            loss = self.objective(model).loss(model(x_in), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_in)
        return AttackResult((x + self.eps * grad.sign()).clamp(0, 1).detach())
