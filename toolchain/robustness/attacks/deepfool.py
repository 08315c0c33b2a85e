"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016): a near-minimal L2 perturbation to the boundary.

Batched, in [0, 1] pixel space, following the multi-class algorithm as the cleverhans
implementation used by BAP's official code runs it: the class to move away from is the
model's own prediction on the clean input, the candidates are the next ``candidates``
classes by clean logit, each iteration linearises the model at the current point and steps to
the nearest linearised boundary, samples stop once their prediction changes, and the total
perturbation is scaled by ``1 + overshoot`` at the end. Not a registered evaluation attack
(it has no eps budget): BAP uses it to measure each sample's distance to the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def deepfool(
    model: nn.Module, x: Tensor, *, steps: int = 5, overshoot: float = 0.02, candidates: int = 3
) -> Tensor:
    """DeepFool examples for ``x``; the model's mode is the caller's, its gradients untouched.

    Args:
        model: differentiable classifier on [0, 1] pixels returning logits.
        x: clean batch.
        steps: iterations at most (samples stop when their prediction flips).
        overshoot: the final perturbation is ``(1 + overshoot)`` times the accumulated one.
        candidates: how many other classes (highest clean logits) are considered.

    Returns:
        ``clip(x + (1 + overshoot) * r)``, detached.
    """
    x = x.detach()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            logits = model(x)
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
