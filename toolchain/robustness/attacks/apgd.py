"""APGD-CE (Croce & Hein, ICML 2020): step-size-free PGD with momentum and checkpoints.

Written from the paper and the facts of its official code (fra31/auto-attack):

* step size starts at ``2 * eps`` (per sample);
* checkpoints ``w_j = ceil(p_j * N)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, i.e. intervals of 22%, 19%, 16%, ...
  of the budget, never shorter than 6%;
* at a checkpoint a sample's step is halved when (1) the share of steps since the last
  checkpoint that increased its loss is at most ``rho = 0.75``, or (2) its step was not
  halved at the previous checkpoint and its best loss did not improve since then; a halved
  sample restarts from its best point;
* momentum ``alpha = 0.75`` (none on the first step).

``steps`` counts iterations; like the official code, one extra gradient is taken at the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only
from toolchain.robustness.attacks.pgd import _l2_normalise, _project, _random_start

RHO = 0.75
ALPHA = 0.75


def checkpoint_intervals(steps: int) -> list[int]:
    """Lengths of the intervals between APGD checkpoints for a budget of ``steps``.

    Matches the official code's integer rounding: 22% first, then 3% shorter each time,
    never below 6% (and never below one step).
    """
    first, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
    intervals, k, total = [], first, 0
    while total + k <= steps:
        intervals.append(k)
        total += k
        k = max(k - shrink, shortest)
    return intervals


@ATTACKS.register("apgd")
class APGD(Attack):
    """APGD on the cross-entropy loss, L-inf or L2.

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``; steps: iterations per restart.
        restarts: random restarts; later restarts attack only samples not yet fooled.
        seed: seeds the random starts; re-applied at every call.

    A sample's result is its first fooling point if any, else its highest-loss point.
    """

    name = "apgd"
    mode = "white-box"

    def __init__(
        self, *, eps: float, norm: str = "linf", steps: int = 100, restarts: int = 1, seed: int = 0
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        if restarts < 1:
            raise UserError(f"attack 'apgd': restarts must be >= 1, got {restarts}")
        self.restarts = restarts

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        best = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        with input_gradients_only(model):
            for _ in range(self.restarts):
                idx = todo.nonzero().squeeze(1)
                x_adv, fooled = self._attack_once(model, x[idx], y[idx], generator)
                best[idx] = x_adv
                todo[idx[fooled]] = False
                if not todo.any():
                    break
        return AttackResult(best)

    def _attack_once(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run from a random start; returns (result per sample, fooled mask)."""
        view = (-1,) + (1,) * (x.dim() - 1)
        x_cur = self._clip(x, x + _random_start(x, self.eps, self.norm, generator))
        loss, grad, fooled = self._loss_grad(model, x_cur, y)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_fool = torch.where(fooled.view(view), x_cur, x)
        ever_fooled = fooled.clone()

        step = torch.full((len(x),), 2 * self.eps, device=x.device)
        x_prev, prev_loss = x_cur.clone(), loss
        increases = torch.zeros(len(x), device=x.device)
        loss_best_at_check = loss_best.clone()
        halved_last = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        checkpoints = iter(checkpoint_intervals(self.steps))
        interval, since_check = next(checkpoints, self.steps + 1), 0

        for i in range(self.steps):
            alpha = ALPHA if i > 0 else 1.0
            z = self._clip(x, x_cur + step.view(view) * self._direction(grad))
            x_next = self._clip(x, x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_next
            loss, grad, fooled = self._loss_grad(model, x_cur, y)

            new_fool = fooled & ~ever_fooled
            x_fool[new_fool] = x_cur[new_fool]
            ever_fooled |= fooled
            increases += (loss > prev_loss).float()
            prev_loss = loss
            better = loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_cur[better], grad[better], loss[better]

            since_check += 1
            if since_check == interval:
                halve = increases <= RHO * interval
                halve |= ~halved_last & (loss_best <= loss_best_at_check)
                step[halve] /= 2
                # Restart halved samples from their best point (the official code keeps the
                # momentum term, i.e. x_prev, as it is).
                x_cur[halve], grad[halve] = x_best[halve], grad_best[halve]
                halved_last, loss_best_at_check = halve, loss_best.clone()
                increases.zero_()
                interval, since_check = next(checkpoints, self.steps + 1), 0

        result = torch.where(ever_fooled.view(view), x_fool, x_best)
        return result.detach(), ever_fooled

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign() if self.norm == "linf" else _l2_normalise(grad)

    def _clip(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        return (x + _project(x_new - x, self.eps, self.norm)).clamp(0, 1)

    @staticmethod
    def _loss_grad(
        model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample CE loss, its input gradient, and which samples are misclassified."""
        x_in = x_adv.detach().requires_grad_(True)
        logits = model(x_in)
        loss = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
        return loss.detach(), grad.detach(), (logits.argmax(1) != y).detach()
