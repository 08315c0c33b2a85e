"""TOG attacks on object detectors (Chow et al., "Adversarial Objectness Gradient Attacks in
Real-time Object Detection Systems", IEEE TPS 2020; official code git-disl/TOG), L-inf.

Each runs TOG's iteration on a detector that follows the detection task's output contract
(:mod:`toolchain.tasks.detection_ops`): from a uniform random start in the ``eps`` ball,
``steps`` signed-gradient steps of ``step_size`` *down* a loss that encodes the adversary's
goal, each projected back into the ball and the image range. TOG's defaults: eps 8/255, step
2/255, 10 iterations. The goals, on the detector's own outputs:

* ``tog-vanishing``: no object at all. The loss is the binary cross-entropy of every class
  logit of every prior towards 0 (and of the quality logit, where the detector has one): the
  "no object" target of every location, TOG's objectness-vanishing gradient.
* ``tog-fabrication``: objects everywhere. The same cross-entropy towards 1, so false
  detections appear.
* ``tog-mislabeling``: the same objects, wrong classes. The targets are the detector's own clean
  detections with every label moved to the least likely class at that detection's prior (TOG's
  "ML-LL" variant), and the loss is the detection task's training loss towards them.

Deviations: TOG's official code attacks YOLO/SSD/Faster R-CNN losses through each model's own
loss layers; ours uses the task's generic heads and loss, which fit any detector of the
contract. Clean detections for the mislabeling targets use the task's post-processing and its
operating score (0.3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.errors import UserError
from toolchain.robustness.attacks.base import ATTACKS, Attack, AttackResult, input_gradients_only
from toolchain.robustness.attacks.pgd import _project, _random_start
from toolchain.tasks.detection import detection_collate_targets
from toolchain.tasks.detection_loss import detection_loss
from toolchain.tasks.detection_ops import OPERATING_SCORE, postprocess, unpack


class _TOG(Attack):
    """TOG's iteration (see the module docstring); subclasses define the goal."""

    mode = "white-box"
    norms = ("linf",)
    tasks = frozenset({"detection"})
    limited_because = "TOG attacks a detector's objectness and class scores"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 10,
        step_size: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, seed=seed)
        if step_size is not None and step_size <= 0:
            raise UserError(f"attack {self.name!r}: step_size must be > 0, got {step_size}")
        self.step_size = step_size if step_size is not None else 2 / 255

    def _goal(self, out: Any, clean: Any, y: Any) -> torch.Tensor:
        """The loss the iteration descends (each registered TOG attack defines its own)."""
        raise UserError(f"attack {self.name!r} has no goal")

    def _run(self, model: nn.Module, x: torch.Tensor, y: Any, generator: torch.Generator) -> AttackResult:
        with torch.no_grad():
            clean = model(x)
        delta = ((x + _random_start(x, self.eps, "linf", generator)).clamp(0, 1) - x).detach()
        with input_gradients_only(model):
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = self._goal(model(x + delta), clean, y)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = _project(delta.detach() - self.step_size * grad.sign(), self.eps, "linf")
                delta = ((x + delta).clamp(0, 1) - x).detach()
        return AttackResult((x + delta).detach())


def _towards(out: Any, value: float) -> torch.Tensor:
    heads = unpack(out)
    logits = [heads.scores] + ([heads.quality] if heads.quality is not None else [])
    return sum(
        (F.binary_cross_entropy_with_logits(t, torch.full_like(t, value), reduction="sum") for t in logits),
        start=torch.zeros(()),
    )


@ATTACKS.register("tog-vanishing")
class TOGVanishing(_TOG):
    """Every location told "no object": the detections vanish."""

    name = "tog-vanishing"

    def _goal(self, out: Any, clean: Any, y: Any) -> torch.Tensor:
        return _towards(out, 0.0)


@ATTACKS.register("tog-fabrication")
class TOGFabrication(_TOG):
    """Every location told "object": false detections appear."""

    name = "tog-fabrication"

    def _goal(self, out: Any, clean: Any, y: Any) -> torch.Tensor:
        return _towards(out, 1.0)


@ATTACKS.register("tog-mislabeling")
class TOGMislabeling(_TOG):
    """The clean detections kept, each labelled with its least likely class (ML-LL)."""

    name = "tog-mislabeling"

    def _goal(self, out: Any, clean: Any, y: Any) -> torch.Tensor:
        return detection_loss(out, self._targets(clean, len(detection_collate_targets(y))))

    def _targets(self, clean: Any, n: int) -> list[dict[str, torch.Tensor]]:
        heads = unpack(clean)
        targets = []
        for i, detections in enumerate(postprocess(clean)[:n]):
            sure = detections.confident(OPERATING_SCORE)
            least = heads.scores[i][sure.priors].argmin(1) if len(sure.priors) else sure.labels
            targets.append(
                {
                    "boxes": sure.boxes,
                    "labels": least,
                    "ignore": torch.zeros(len(sure.boxes), dtype=torch.bool),
                }
            )
        return targets
