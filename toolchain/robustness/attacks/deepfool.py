"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016): a near-minimal L2 perturbation to the boundary.

Batched, in [0, 1] pixel space, following the multi-class algorithm as the cleverhans
implementation used by BAP's official code runs it: the class to move away from is the
model's own prediction on the clean input, the candidates are the next ``candidates``
classes by clean logit, each iteration linearises the model at the current point and steps to
the nearest linearised boundary, samples stop once their prediction changes, and the total
perturbation is scaled by ``1 + overshoot`` at the end. Not a registered evaluation attack
(it has no eps budget): BAP uses it to measure each sample's distance to the boundary.

Segmentation models (``N x K x H x W`` logits) have no single decision per image, so DeepFool
runs on our per-pixel reading of one (:func:`deepfool_pixels`): the binary classifier whose
score is an image's mean per-pixel margin of its clean prediction,
``f(x) = mean_p (z_p[c_p](x) - max_{j != c_p} z_p[j](x))`` with ``c_p`` the clean arg-max at
pixel ``p``. ``f > 0`` on the clean image; at ``f = 0`` the average pixel sits on its class
boundary. Each iteration steps to the linearised ``f = 0`` (binary DeepFool:
``r = -(|f| + 1e-4) * grad f / ||grad f||^2``); an image stops once ``f <= 0``. The image's
distance to that boundary is what BAP's cutoff then scales, as for a classifier.

Detectors (raw heads, a tuple) have no class per image either: DeepFool runs the same binary
form on the task's margin (:meth:`~toolchain.tasks.base.Objective.margin`, for detection how far
the labelled objects are above the operating score), which needs the labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Any = None,
    *,
    steps: int = 5,
    overshoot: float = 0.02,
    candidates: int = 3,
) -> Tensor:
    """DeepFool examples for ``x``; the model's mode is the caller's, its gradients untouched.

    Args:
        model: differentiable classifier on [0, 1] pixels returning logits.
        x: clean batch.
        steps: iterations at most (samples stop when their prediction flips).
        overshoot: the final perturbation is ``(1 + overshoot)`` times the accumulated one.
        candidates: how many other classes (highest clean logits) are considered (per-image
            logits only: the per-pixel margin takes every other class at each pixel).
        y: the labels, read only by a model whose output is neither per-image nor per-pixel
            logits (a detector): DeepFool then runs on its task's margin.

    Returns:
        ``clip(x + (1 + overshoot) * r)``, detached.
    """
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, Tensor):  # a detector's heads: DeepFool on the task's margin
        from toolchain.tasks import task_of  # lazy: tasks import nothing of attacks

        task = task_of(model)
        return deepfool_binary(
            model, x, lambda out: task.objective.margin(out, y), steps=steps, overshoot=overshoot
        )
    if logits.dim() == 4:  # per-pixel logits: DeepFool on the mean pixel margin
        return deepfool_pixels(model, x, logits.argmax(1), steps=steps, overshoot=overshoot)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        k = min(candidates + 1, logits.shape[1])
        classes = logits.topk(k, dim=1).indices  # column 0: the model's own prediction
        r_total = torch.zeros_like(x)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(steps):
            x_adv = (x + r_total).clamp(0, 1).requires_grad_(True)
            out = model(x_adv)
            active &= out.argmax(1) == classes[:, 0]
            if not active.any():
                break
            picked = out.gather(1, classes)
            grads = [
                torch.autograd.grad(picked[:, j].sum(), x_adv, retain_graph=j < k - 1)[0] for j in range(k)
            ]
            w = torch.stack([g - grads[0] for g in grads[1:]], dim=1)  # (N, k-1, C, H, W)
            f = (picked[:, 1:] - picked[:, :1]).detach()  # (N, k-1)
            w_norm = w.flatten(2).norm(dim=2)
            distance = (f.abs() + 1e-5) / (w_norm + 1e-8)
            nearest = distance.argmin(1)
            index = torch.arange(len(x), device=x.device)
            step = (distance[index, nearest] + 1e-4) / (w_norm[index, nearest] + 1e-8)
            r = step.view(-1, *([1] * (x.dim() - 1))) * w[index, nearest]
            r_total = r_total + r * active.view(-1, *([1] * (x.dim() - 1)))
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return (x + (1 + overshoot) * r_total).clamp(0, 1).detach()


def mean_pixel_margin(logits: Tensor, classes: Tensor) -> Tensor:
    """Per image, the mean over pixels of ``z[c] - max_{j != c} z[j]`` for the classes ``c``
    (``N x H x W``) of ``N x K x H x W`` logits."""
    own = logits.gather(1, classes.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, classes.unsqueeze(1), float("-inf")).amax(1)
    return (own - other).flatten(1).mean(1)


def deepfool_pixels(
    model: nn.Module, x: Tensor, classes: Tensor, *, steps: int = 5, overshoot: float = 0.02
) -> Tensor:
    """DeepFool towards the boundary of the mean per-pixel margin (the module docstring).

    Args:
        model: differentiable segmentation model on [0, 1] pixels (mode: the caller's).
        x: clean batch; classes: ``N x H x W``, the model's clean per-pixel prediction.
        steps: iterations at most (images stop when their mean margin is no longer positive).
        overshoot: the final perturbation is ``(1 + overshoot)`` times the accumulated one.

    Returns:
        ``clip(x + (1 + overshoot) * r)``, detached.
    """
    return deepfool_binary(
        model, x, lambda out: mean_pixel_margin(out, classes), steps=steps, overshoot=overshoot
    )


def deepfool_binary(
    model: nn.Module,
    x: Tensor,
    score: Callable[[Any], Tensor],
    *,
    steps: int = 5,
    overshoot: float = 0.02,
) -> Tensor:
    """Binary DeepFool towards ``score(model(x)) = 0``, one score per image, positive on the
    clean image; an image stops once its score is no longer positive.

    Returns:
        ``clip(x + (1 + overshoot) * r)``, detached.
    """
    view = (-1, *([1] * (x.dim() - 1)))
    r_total = torch.zeros_like(x)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv = (x + r_total).clamp(0, 1).requires_grad_(True)
            f = score(model(x_adv))
            active &= f.detach() > 0
            if not active.any():
                break
            # Each image's score depends on its own pixels only (eval-mode BN), so the gradient
            # of the sum is every image's own gradient.
            (grad,) = torch.autograd.grad(f.sum(), x_adv)
            # An image whose score has no gradient (a detector that sees none of its objects)
            # has nothing to follow: it stays where it is.
            size = (f.detach().abs() + 1e-4) / grad.flatten(1).pow(2).sum(1).clamp_min(1e-8)
            size = torch.where(grad.flatten(1).abs().sum(1) > 0, size, torch.zeros_like(size))
            r_total = r_total - (size * active).view(view) * grad
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return (x + (1 + overshoot) * r_total).clamp(0, 1).detach()
