"""APGD-CE (Croce & Hein, ICML 2020): step-size-free PGD with momentum and checkpoints.

Written from the paper and the facts of its official code (fra31/auto-attack,
``autopgd_base.py``):

* step size starts at ``2 * eps`` (per sample);
* checkpoints ``w_j = ceil(p_j * N)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, i.e. intervals of 22%, 19%, 16%, ...
  of the budget, never shorter than 6%;
* at a checkpoint a sample's step is halved when (1) the share of steps since the last
  checkpoint that increased its loss is at most ``rho = 0.75``, or (2) its step was not
  halved at the previous checkpoint and its best loss did not improve since then; a halved
  sample restarts from its best point. Condition (2) is off at the first checkpoint: the
  reference starts as if every step had just been halved (``reduced_last_check = 1``);
* momentum ``alpha = 0.75`` (none on the first step).

``steps`` counts iterations; like the official code, one extra gradient is taken at the start.
The L2 random start lies on the sphere of radius ``eps`` (a random direction at full radius), as
in the reference. A fooled sample's result is the point the reference keeps: the *last* iterate
that fooled the model in the run that first fooled it (later iterates sit deeper in the wrong
class, so they transfer to an engine better than the first fooling one); later restarts (and
APGD-T's later targets) attack only samples not fooled yet. Deviation: a sample never fooled
returns, over every restart and target, the point with the highest task loss (the
cross-entropy) instead of the clean image, which transfers better to an engine.

The loss is the model's task's per-image loss: the cross-entropy for classifiers; for
segmentation models each image's mean per-pixel cross-entropy over its labelled pixels (our
per-pixel APGD-CE: the step size and checkpoints stay per image), where "fooled" is the
task's rule and the segmentation suite keeps every image's highest-loss point instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from exporters.outputs import map_outputs
from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only
from toolchain.robustness.attacks.pgd import _l2_normalise, _project, _random_start
from toolchain.tasks import take_labels

RHO = 0.75
ALPHA = 0.75

#: A per-sample loss to maximise: ``(logits, labels) -> (N,)``.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class StepSizeSchedule:
    """APGD's checkpoint rule for one batch: which samples halve their step, and when.

    Feed it every iteration's loss and best loss with :meth:`observe`; at a checkpoint it
    returns the samples whose step is halved (otherwise ``None``).

    As in the reference, the first iteration's loss is compared with 0 (the reference's
    loss history starts as zeros), so for the cross-entropy the first step always counts as
    an increase; and no sample counts as "not halved last time" at the first checkpoint.
    """

    def __init__(self, n: int, steps: int, loss_best: torch.Tensor) -> None:
        self._intervals = iter(checkpoint_intervals(steps))
        self._steps = steps
        self.interval = next(self._intervals, steps + 1)
        self._since = 0
        self._increases = torch.zeros(n, device=loss_best.device)
        self._prev_loss = torch.zeros(n, device=loss_best.device)
        self._halved_last = torch.ones(n, dtype=torch.bool, device=loss_best.device)
        self._best_at_check = loss_best.clone()

    def observe(self, loss: torch.Tensor, loss_best: torch.Tensor) -> torch.Tensor | None:
        """Record one iteration. Returns the mask of samples to halve at a checkpoint, else None.

        Args:
            loss: this iteration's per-sample loss.
            loss_best: the best loss so far per sample, this iteration included.
        """
        self._increases += (loss > self._prev_loss).float()
        self._prev_loss = loss
        self._since += 1
        if self._since < self.interval:
            return None
        halve = self._increases <= RHO * self.interval
        halve |= ~self._halved_last & (loss_best <= self._best_at_check)
        self._halved_last, self._best_at_check = halve, loss_best.clone()
        self._increases.zero_()
        self.interval, self._since = next(self._intervals, self._steps + 1), 0
        return halve


@ATTACKS.register("apgd")
class APGD(Attack):
    """APGD on the cross-entropy loss, L-inf or L2.

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``; steps: iterations per restart.
        restarts: random restarts; later restarts attack only samples not yet fooled.
        seed: seeds the random starts; re-applied at every call.

    A sample's result is its last fooling iterate if any (the reference's point), else its
    highest-loss point over every restart.
    """

    name = "apgd"
    mode = "white-box"
    tasks = frozenset({"classification", "segmentation", "detection"})

    def __init__(
        self, *, eps: float, norm: str = "linf", steps: int = 100, restarts: int = 1, seed: int = 0
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        if restarts < 1:
            raise UserError(f"attack {self.name!r}: restarts must be >= 1, got {restarts}")
        self.restarts = restarts

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        highest = self.objective(model).keep_highest_loss
        return AttackResult(self.attack_every_image(model, x, y, generator, highest_loss=highest))

    def attack_every_image(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        highest_loss: bool = False,
    ) -> torch.Tensor:
        """APGD on every image of ``(x, y)`` (no correct-only rule), on the model's task's
        per-image loss: the cross-entropy, or for segmentation the mean per-pixel cross-entropy
        over each image's labelled pixels (APGD-CE per pixel, the step size still per image).

        Args:
            highest_loss: each image's result is its highest-loss point rather than its first
                fooling one (segmentation: the mIoU keeps falling after half the pixels flip).

        Returns:
            The adversarial batch, detached.
        """
        task = self.objective(model)

        def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return task.loss(logits, labels, reduction="none")  # F.cross_entropy's, for classifiers

        best = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        with input_gradients_only(model):
            self._restarts(
                model, x, y, lambda _: loss, best, todo, best_loss, generator, highest_loss=highest_loss
            )
        return best

    def _restarts(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_for: Callable[[torch.Tensor], Loss],
        best: torch.Tensor,
        todo: torch.Tensor,
        best_loss: torch.Tensor,
        generator: torch.Generator,
        *,
        highest_loss: bool = False,
    ) -> None:
        """Run the restarts on the samples still in ``todo``, updating ``best``, ``todo`` and
        ``best_loss`` (each sample's task loss at ``best``; ``-inf`` before any run).

        ``loss_for(indices)`` gives the loss for those samples (APGD-T's loss depends on each
        sample's target class); ``highest_loss`` as :meth:`attack_every_image`.
        A sample a run fools takes that run's result and leaves ``todo``; a sample it does not
        fool takes the result only when its task loss beats ``best_loss``.
        """
        task = self.objective(model)
        for _ in range(self.restarts):
            idx = todo.nonzero().squeeze(1)
            if len(idx) == 0:
                return
            labels = take_labels(y, idx)
            x_adv, fooled = self._attack_once(
                model, x[idx], labels, loss_for(idx), generator, highest_loss=highest_loss
            )
            with torch.no_grad():
                task_loss = task.loss(model(x_adv), labels, reduction="none")
            keep = fooled | (task_loss > best_loss[idx])
            best[idx[keep]] = x_adv[keep]
            best_loss[idx[keep]] = task_loss[keep]
            todo[idx[fooled]] = False

    def _attack_once(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss,
        generator: torch.Generator,
        *,
        highest_loss: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run from a random start; returns (result per sample, fooled mask)."""
        view = (-1,) + (1,) * (x.dim() - 1)
        x_cur = self._clip(x, x + _random_start(x, self.eps, self.norm, generator, l2_on_sphere=True))
        loss, grad, fooled = self._loss_grad(model, x_cur, y, loss_fn)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_fool = torch.where(fooled.view(view), x_cur, x)
        ever_fooled = fooled.clone()

        step = torch.full((len(x),), 2 * self.eps, device=x.device)
        x_prev = x_cur.clone()
        schedule = StepSizeSchedule(len(x), self.steps, loss_best)

        for i in range(self.steps):
            alpha = ALPHA if i > 0 else 1.0
            z = self._clip(x, x_cur + step.view(view) * self._direction(grad))
            x_next = self._clip(x, x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_next
            loss, grad, fooled = self._loss_grad(model, x_cur, y, loss_fn)

            x_fool[fooled] = x_cur[fooled]  # the reference keeps the latest fooling iterate
            ever_fooled |= fooled
            better = loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_cur[better], grad[better], loss[better]

            halve = schedule.observe(loss, loss_best)
            if halve is not None:
                step[halve] /= 2
                # Restart halved samples from their best point (the official code keeps the
                # momentum term, i.e. x_prev, as it is).
                x_cur[halve], grad[halve] = x_best[halve], grad_best[halve]

        result = x_best if highest_loss else torch.where(ever_fooled.view(view), x_fool, x_best)
        return result.detach(), ever_fooled

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign() if self.norm == "linf" else _l2_normalise(grad)

    def _clip(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        return (x + _project(x_new - x, self.eps, self.norm)).clamp(0, 1)

    def _loss_grad(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: Loss
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, its input gradient, and which samples are fooled (misclassified; for
        segmentation, the task's rule: fewer than half of the labelled pixels right)."""
        x_in = x_adv.detach().requires_grad_(True)
        logits = model(x_in)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
        outputs = map_outputs(lambda t: t.detach(), logits)
        return loss.detach(), grad.detach(), self.objective(model).fooled(outputs, y)
