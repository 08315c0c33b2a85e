"""Projected gradient descent (Madry et al. 2018), L-inf and L2, in [0, 1] pixel space."""

from __future__ import annotations

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.recipe_train import AttackConfig
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, eval_mode
from toolchain.tasks import Objective, task_of


def _l2_normalise(t: torch.Tensor) -> torch.Tensor:
    norms = t.flatten(1).norm(dim=1).clamp_min(1e-12)
    return t / norms.view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def _random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None, *, l2_on_sphere: bool = False
) -> torch.Tensor:
    """A random perturbation: uniform in the L-inf box; for L2 a random direction at a uniform
    radius in ``[0, eps]`` (PGD), or at radius ``eps`` with ``l2_on_sphere`` (APGD's reference)."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        return (noise * 2 - 1) * eps
    direction = _l2_normalise(torch.randn(x.shape, generator=generator, device="cpu").to(x.device))
    if l2_on_sphere:
        return direction * eps
    radius = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device)
    return direction * (radius * eps).view(-1, *([1] * (x.dim() - 1)))


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """Untargeted PGD on the loss of the model's task (cross-entropy; per pixel for segmentation).

    The model is used as it is (train or eval mode is the caller's choice) and its parameter
    gradients are left untouched. With several restarts, each sample keeps the first restart
    that fools the model (or the last one if none does).

    Args:
        model: differentiable classifier taking [0, 1] pixels, returning logits.
        x: clean batch in [0, 1]; y: integer labels.
        eps: radius of the ``norm`` ball; 0 returns ``x`` unchanged.
        step_size: step length (sign step for L-inf, normalised-gradient step for L2).
        steps: number of iterations; 0 with random_start gives a random point in the ball.
        norm: ``"linf"`` or ``"l2"``.
        generator: CPU generator for the random start, for reproducible attacks.
        objective: the loss and fooling rule; default the model's task's.

    Returns:
        The adversarial batch, detached, in [0, 1].
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x = x.detach()
    if eps <= 0:
        return x.clone()
    task = objective or task_of(model).objective
    best = x.clone()
    still_correct = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(max(restarts, 1)):
            delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
            delta = ((x + delta).clamp(0, 1) - x).detach()
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = task.loss(model(x + delta), y)
                (grad,) = torch.autograd.grad(loss, delta)
                step = grad.sign() if norm == "linf" else _l2_normalise(grad)
                delta = _project(delta.detach() + step_size * step, eps, norm)
                delta = ((x + delta).clamp(0, 1) - x).detach()
            x_adv = (x + delta).detach()
            with torch.no_grad():
                fooled = task.fooled(model(x_adv), y)
            # Samples not yet fooled take this restart's point; fooled ones keep theirs.
            best[still_correct] = x_adv[still_correct]
            still_correct &= ~fooled
            if not still_correct.any():
                break
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return best


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD examples from a recipe's attack section (training, pruning scores and probes, the
    INT8 calibration set), crafted in eval mode: BatchNorm statistics stay frozen, every
    module's mode and the parameter gradients are restored after. Every image is perturbed
    (no correct-only rule: these are training or calibration inputs, not a verdict).

    Args:
        model: the model the examples are crafted on (its task's loss).
        x, y: a clean batch in [0, 1] and its labels.
        attack: ``eps``, ``step_size``, ``steps``, ``norm``, ``random_start``.
        generator: CPU generator of the random start.
    """
    with eval_mode(model):
        return pgd_attack(
            model,
            x,
            y,
            eps=attack.eps,
            step_size=attack.step_size,
            steps=attack.steps,
            norm=attack.norm,
            random_start=attack.random_start,
            generator=generator,
        )


def single_step(attack: AttackConfig, *, random_start: bool = False) -> AttackConfig:
    """``attack`` as one step of size eps: FGSM (Goodfellow et al. 2015), or with a random
    start R-FGSM-like (Tramer et al. 2018)."""
    return attack.model_copy(update={"step_size": attack.eps, "steps": 1, "random_start": random_start})


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD on the cross-entropy loss, L-inf or L2, with random start and restarts.

    A thin class around :func:`pgd_attack` (which training and pruning call directly).

    Args:
        eps: ball radius; norm: ``"linf"`` or ``"l2"``; steps: iterations.
        step_size: step length; default ``2.5 * eps / steps`` (Madry et al.), so the walk can
            cross the ball and come back.
        restarts: independent random starts; each sample keeps the first that fools the model.
        random_start: start at a uniform point in the ball (else at ``x``).
        seed: seeds the random starts; re-applied at every call.
    """

    name = "pgd"
    mode = "white-box"
    tasks = frozenset({"classification", "segmentation", "detection"})

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        if restarts < 1:
            raise UserError(f"attack 'pgd': restarts must be >= 1, got {restarts}")
        if step_size is not None and step_size <= 0:
            raise UserError(f"attack 'pgd': step_size must be > 0, got {step_size}")
        self.step_size = step_size if step_size is not None else 2.5 * self.eps / max(self.steps, 1)
        self.restarts, self.random_start = restarts, random_start

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        x_adv = pgd_attack(
            model,
            x,
            y,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            restarts=self.restarts,
            generator=generator,
            objective=self.objective(model),
        )
        return AttackResult(x_adv)
