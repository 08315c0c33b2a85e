"""Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """``x + eps * sign(grad_x CE(f(x), y))``, clamped to [0, 1].

    Deterministic and single-step: ``steps``, ``restarts`` and ``seed`` have no effect.
    """

    name = "fgsm"
    mode = "white-box"
    norms = ("linf",)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        with input_gradients_only(model):
            x_in = x.clone().requires_grad_(True)
            # Summed (not averaged) loss: the sign is the same, and tiny per-sample gradients
            # of a large batch do not underflow.
            loss = F.cross_entropy(model(x_in), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_in)
        return AttackResult((x + self.eps * grad.sign()).clamp(0, 1).detach())
