"""``bap``: gradual pruning trained on cutoff-scaled DeepFool perturbations (blind budget).

Xie et al., "Blind Adversarial Pruning: Towards the Comprehensive Robust Models with Gradually
Pruning against Blind Adversarial Attacks", 2020; official TensorFlow code
github.com/Lixin-Qian/BAP (read for this implementation, not copied).

What follows the paper and its code:

* adversarial examples from DeepFool (cleverhans settings: the model's own prediction as the
  class to leave, overshoot 0.02, 5 iterations during training);
* the cutoff-scale strategy on each perturbation ``eta = x_adv - x``: the per-sample RMS L2
  norm ``sqrt(sum(eta^2) / (C*H*W))``, a cut ``eta <- eta * min(1, delta / norm)`` per sample
  with ``delta`` a fixed RMS norm or the batch mean of the norms, then a uniform scale
  ``eta <- rho * eta``; the budget is thus each sample's own distance to the boundary, capped;
* loss ``0.5 * CE(x) + 0.5 * CE(x_adv)`` (``train.loss: hybrid``);
* gradual magnitude pruning on the cubic schedule
  ``s_t = s_f + (s_0 - s_f) * (1 - (t - t_0) / (n * dt))^3``, masks updated every ``dt`` steps,
  the same schedule for every layer.

What is ours: the original prunes weights (unstructured); here the schedule runs, in every
dependency group, from none to all of the group's final *channel* removal, the final keep
counts being the uniform ratio that meets the MACs budget; channels are ranked by
torch-pruning's group L2 norm (a channel once removed stays removed). The official runs set
``delta = 1.0`` (RMS, on [0, 1] images: no cut in practice) and ``rho = 1``; our default cuts
at the batch mean, the adaptive budget the paper describes. DeepFool considers 3 candidate
classes by default (cleverhans: 10) to keep training affordable on CPU. Label smoothing of the
official code is not used. Segmentation models: DeepFool runs on the mean per-pixel margin of
the clean prediction (:func:`~toolchain.robustness.attacks.deepfool.deepfool_pixels`, our
per-pixel reading), so each image's budget is its distance to the boundary where its average
pixel flips; the hybrid loss is the task's per-pixel cross-entropy.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome
from toolchain.pruning.methods.masked import MaskedMethod, group_topk, keep_counts, magnitude_positions
from toolchain.recipe_prune import PGD3, TrainingSection
from toolchain.recipe_train import Number, TrainConfig
from toolchain.robustness.attacks.deepfool import deepfool
from toolchain.training import Step, TrainHooks


def rms_norms(eta: Tensor) -> Tensor:
    """Per-sample RMS L2 norm of a perturbation batch, as BAP's ``get_norm(ord=2)``."""
    return (eta.flatten(1).pow(2).mean(1)).clamp_min(1e-12).sqrt()


def cutoff_scale(x: Tensor, x_adv: Tensor, cutoff: str | float, scale: float) -> tuple[Tensor, Tensor]:
    """Cut each perturbation to ``cutoff`` (a number, or the batch mean of the RMS norms), then
    scale it by ``scale``.

    Returns:
        ``(x + eta', norms)``: the new adversarial batch (clipped to [0, 1]) and the per-sample
        RMS norm of ``eta'``, the budget each sample actually got.
    """
    eta = x_adv - x
    norms = rms_norms(eta)
    delta = norms.mean() if cutoff == "batch-mean" else torch.tensor(float(cutoff))
    factor = torch.clamp(delta / norms, max=1.0)
    eta = scale * eta * factor.view(-1, *([1] * (x.dim() - 1)))
    out = (x + eta).clamp(0, 1)
    return out, rms_norms(out - x)


def cubic_fraction(progress: float, final: float, initial: float) -> float:
    """The cubic schedule at ``progress`` in [0, 1] (Zhu & Gupta 2017, as tfmot's PolynomialDecay)."""
    p = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 - p) ** 3


class BapConfig(TrainingSection):
    """BAP (Xie et al. 2020): gradual pruning trained on cutoff-scaled DeepFool perturbations.

    The channel ratio follows the cubic schedule from ``initial_sparsity`` of the final ratio at
    ``begin`` to the final ratio at ``end`` (fractions of the training steps), masks updated
    every ``update_every`` steps; ``train.loss`` is normally ``hybrid`` (0.5 clean + 0.5
    adversarial). Perturbations: DeepFool (``deepfool_steps``, ``overshoot``, ``candidates``)
    cut to ``cutoff`` (``batch-mean`` of the per-sample RMS norms, or a number) and scaled by
    ``scale``.
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.01, loss="hybrid", attack=PGD3)
    begin: float = Field(0.0, ge=0, lt=1, description="fraction of steps where pruning starts")
    end: float = Field(0.7, gt=0, le=1, description="fraction of steps where the final ratio is reached")
    update_every: int = Field(20, ge=1, description="steps between mask updates")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="ratio at `begin` (fraction of the final)")
    deepfool_steps: int = Field(5, ge=1, description="DeepFool iterations per perturbation")
    overshoot: float = Field(0.02, ge=0, description="DeepFool's overshoot past the decision boundary")
    candidates: int = Field(3, ge=1, description="classes DeepFool considers besides the true one")
    cutoff: Literal["batch-mean"] | Number = Field(
        "batch-mean",
        description="the per-sample budget the perturbations are cut to: batch-mean (mean RMS norm of the "
        "batch) or a fixed RMS norm",
    )
    scale: float = Field(1.0, gt=0, description="rho: perturbations are multiplied by this after the cutoff")

    @model_validator(mode="after")
    def _check(self) -> BapConfig:
        if self.end <= self.begin:
            raise ValueError(f"end ({self.end}) must come after begin ({self.begin})")
        if isinstance(self.cutoff, float) and self.cutoff <= 0:
            raise ValueError(f"cutoff must be 'batch-mean' or a positive RMS norm, got {self.cutoff}")
        return self


@METHODS.register("bap")
class Bap(MaskedMethod):
    """Gradual channel pruning, hybrid loss on cutoff-scaled DeepFool perturbations."""

    name = "bap"
    settings = BapConfig
    description = "BAP: gradual channel pruning trained on cutoff-scaled DeepFool examples"

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: BapConfig = self.own
        masks = self.masks(model, job)
        final = keep_counts(
            masks, self.allocate(masks, magnitude_positions(model, masks, job), job, "layer").mask
        )
        mask = masks.ones()
        budgets: list[list[float]] = []  # per batch: mean, min, max RMS norm actually used
        updates: list[dict[str, Any]] = []

        def perturb(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            x_adv = deepfool(
                m, x, y, steps=own.deepfool_steps, overshoot=own.overshoot, candidates=own.candidates
            )
            out, norms = cutoff_scale(x, x_adv, own.cutoff, own.scale)
            budgets.append([round(float(v), 5) for v in (norms.mean(), norms.min(), norms.max())])
            return out

        def update(share: float, step: int) -> None:
            """Remove ``share`` of each group's final removal, weakest channels first."""
            nonlocal mask
            masks.detach()  # score the plain model: tracing must not see the mask hooks
            scores = magnitude_positions(model, masks, job)
            masks.attach(lambda: mask)
            scores[mask == 0] = -float("inf")  # a removed channel stays removed
            keep = {
                i: g.positions - round(share * (g.positions - final[i])) for i, g in enumerate(masks.groups)
            }
            mask = group_topk(scores, masks, keep)
            macs, params = masks.cost(mask)
            updates.append({"step": step, "share": share, "macs": macs, "params": params})

        def after_step(state: Step) -> None:
            progress = (state.step + 1) / state.total
            if progress < own.begin:
                return
            at_end = progress >= own.end and (not updates or updates[-1]["share"] < 1.0)
            if (state.step + 1) % own.update_every == 0 or at_end:
                schedule = (progress - own.begin) / (own.end - own.begin)
                update(cubic_fraction(schedule, 1.0, own.initial_sparsity), state.step + 1)

        def metrics() -> dict[str, float]:
            recent = budgets[-50:]
            return {
                "budget_rms_mean": sum(b[0] for b in recent) / max(len(recent), 1),
                "live_positions": float(mask.sum()),
            }

        def state() -> dict[str, Any]:
            return {"mask": mask.clone(), "updates": list(updates), "budgets": list(budgets)}

        def load_state(saved: dict[str, Any]) -> None:
            nonlocal mask
            mask = saved["mask"]
            updates[:], budgets[:] = saved["updates"], saved["budgets"]

        hooks = TrainHooks(
            perturb=perturb, after_step=after_step, metrics=metrics, state=state, load_state=load_state
        )
        with masks.attached(lambda: mask):
            epochs = self.train(model, job, hooks)
        if not updates or updates[-1]["share"] < 1.0:
            update(1.0, -1)
        masks.detach()
        info = {"updates": updates, "budget_rms": _summary(budgets)}
        history = self.remove(model, masks, mask, job)
        return PruneOutcome(model, history, epochs, info, trace={"budgets": budgets})


def _summary(budgets: list[list[float]]) -> dict[str, float]:
    """Mean, smallest and largest per-sample RMS budget over all batches."""
    if not budgets:
        return {}
    return {
        "mean": sum(b[0] for b in budgets) / len(budgets),
        "min": min(b[1] for b in budgets),
        "max": max(b[2] for b in budgets),
        "batches": len(budgets),
    }
