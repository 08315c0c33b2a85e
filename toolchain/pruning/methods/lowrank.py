"""``lowrank``: factorise layers with globally chosen ranks, optionally after channel pruning.

Phan et al., "CSTAR: Towards Compact and Structured Deep Neural Networks with Adversarial
Robustness", AAAI 2023. Only the abstract is available: low-rank compactness, structure and
adversarial robustness in one formulation, ranks chosen globally (a Tucker-2 projection
inside training), 2x-64x compression. Our design, stated as such:

* every convolution (groups 1) becomes a Tucker-2 chain by HOSVD and every 1x1 convolution or
  linear layer an SVD pair (:mod:`toolchain.pruning.lowrank`); the classifier head stays;
* ranks come from singular-value energy: a layer keeps, per mode, the smallest rank retaining
  a share ``e`` of that mode's energy, and is factorised only where that is cheaper than the
  layer itself; one global ``e`` is bisected on the exact MACs (or params) formula until the
  budget is met. ``scoring: robust`` lowers ``e`` less for layers whose truncation (alone, to
  ``probe_energy``) raises the adversarial loss most, as ``mrs`` does for channels;
* with ``channel_reduction`` one step of channel pruning (``prune.criterion``) runs first, and
  the factorisation takes the model the rest of the way to the overall target;
* no projection inside training: the recipe's adversarial ``finetune`` recovers accuracy.

The factorisation is recorded in the saved model (``structure``) and replayed on load, after
the channel-pruning history, so reloading needs no pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from toolchain.pruning.budget import Budget, check_reachable, unreachable
from toolchain.pruning.criteria import CRITERIA
from toolchain.pruning.graph import HistoryEntry, count_macs_params
from toolchain.pruning.lowrank import (
    LayerShape,
    factorize,
    layer_shapes,
    rank_for_energy,
    replace_with_factors,
    spectra,
)
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome, PruningMethod
from toolchain.pruning.methods.iterative import iterative_prune
from toolchain.pruning.methods.probe import adversarial_loss, take
from toolchain.pruning.trial import check_removal
from toolchain.recipe_prune import PGD3, MethodSection
from toolchain.recipe_train import AttackConfig


def ranks_at(sigmas: Sequence[Tensor], energy: float) -> list[int]:
    return [rank_for_energy(s, energy) for s in sigmas]


class RankPlan:
    """Per layer: its shape, spectra and sensitivity; the cost of the model at a global energy."""

    def __init__(
        self, shapes: dict[str, LayerShape], sigmas: dict[str, list[Tensor]], total: tuple[int, int]
    ) -> None:
        self.shapes, self.sigmas, self.total = shapes, sigmas, total
        self.sensitivity = {name: 0.0 for name in shapes}
        self.protection = 0.0

    def energy_of(self, name: str, energy: float) -> float:
        """Sensitive layers keep more: ``1 - (1 - e) * (1 - protection * s)``."""
        return 1.0 - (1.0 - energy) * (1.0 - self.protection * self.sensitivity[name])

    def plan(self, energy: float) -> dict[str, list[int]]:
        """Layers worth factorising at ``energy`` and their ranks."""
        chosen = {}
        for name, shape in self.shapes.items():
            ranks = ranks_at(self.sigmas[name], self.energy_of(name, energy))
            if shape.macs(ranks) < shape.macs(None):
                chosen[name] = ranks
        return chosen

    def cost(self, plan: dict[str, list[int]]) -> tuple[int, int]:
        macs, params = self.total
        for name, ranks in plan.items():
            shape = self.shapes[name]
            macs += shape.macs(ranks) - shape.macs(None)
            params += shape.params(ranks) - shape.params(None)
        return macs, params


class LowrankConfig(MethodSection):
    """CSTAR-style low-rank factorisation with globally chosen ranks (our design from the abstract).

    Convolutions become Tucker-2 chains (1x1, k x k core, 1x1), 1x1 convolutions and linear
    layers SVD pairs; every layer keeps the ranks that retain a share of its singular-value
    energy, the share being one global value bisected to meet the budget (``scoring: energy``)
    or lowered less for layers whose truncation raises the adversarial loss most
    (``scoring: robust``: each layer alone truncated to ``probe_energy``, loss measured with
    ``probe_attack`` on ``probe_batches`` batches; ``protection`` as in ``mrs``). With
    ``channel_reduction`` channels are first pruned to that reduction (one step of
    ``prune.criterion``), and the factorisation brings the whole model to the target.
    """

    scoring: Literal["energy", "robust"] = Field(
        "energy",
        description="energy: one global share of singular-value energy; robust: layers whose truncation "
        "raises the adversarial loss are spared",
    )
    channel_reduction: float | None = Field(None, gt=1.0, description="prune channels to this first")
    probe_energy: float = Field(0.9, gt=0, lt=1, description="robust scoring: energy kept when probing")
    probe_batches: int = Field(
        2, ge=1, description="robust scoring: batches the adversarial loss is measured on"
    )
    probe_attack: AttackConfig = PGD3
    protection: float = Field(
        0.8, ge=0, lt=1, description="robust scoring: how much sensitive layers are spared"
    )


@METHODS.register("lowrank")
class Lowrank(PruningMethod):
    """Tucker-2 / SVD factorisation with globally chosen ranks (optionally after channels)."""

    name = "lowrank"
    prune_keys = frozenset({"criterion", "importance_batches", "attack"})
    settings = LowrankConfig
    description = "CSTAR-style low-rank factorisation, ranks chosen globally under the budget"

    @property
    def prunes_channels(self) -> bool:
        return self.own.channel_reduction is not None

    def check(
        self, model: nn.Module, example_inputs: Tensor, ignored: list[nn.Module], budget: Budget
    ) -> None:
        own: LowrankConfig = self.own
        if own.channel_reduction is not None:
            masks = ChannelMasks(
                model, example_inputs, ignored, max_layer_pruning=budget.max_layer_pruning, strict=False
            )
            check_reachable(masks, replace(budget, reduction=own.channel_reduction))
            check_removal(model, example_inputs, ignored, max_layer_pruning=budget.max_layer_pruning)
            return  # how far factorising the pruned model goes is known only once it is pruned
        plan = self._rank_plan(model, example_inputs, ignored)
        self._reachable(plan, budget, budget.pick(*plan.total))

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: LowrankConfig = self.own
        cfg, budget, x = self.cfg, job.budget, job.example_inputs
        dense_macs, dense_params = count_macs_params(model, x)
        dense = budget.pick(dense_macs, dense_params)
        history: list[HistoryEntry] = []
        steps: list[dict[str, Any]] = []
        if own.channel_reduction is not None:
            needs_grad = CRITERIA.get(cfg.criterion).needs_gradients
            channel_job = replace(job, budget=replace(budget, reduction=own.channel_reduction))
            history, steps = iterative_prune(
                model,
                channel_job,
                criterion=cfg.criterion,
                steps=1,
                loader=job.loader(1) if needs_grad else None,
                importance_batches=cfg.importance_batches,
                attack=job.attack,
                between_steps=None,
            )
        plan = self._rank_plan(model, x, job.ignored_layers)
        if own.scoring == "robust":
            self._probe(model, plan, take(job.loader(5), own.probe_batches), own)
        energy, chosen = self._search(plan, budget, dense)
        structure = replace_with_factors(model, chosen)
        macs, params = count_macs_params(model, x)
        steps.append(
            {"step": len(steps) + 1, "energy": energy, "layers": len(chosen), "macs": macs, "params": params}
        )
        info = {
            "energy": energy,
            "scoring": own.scoring,
            "channel_reduction": own.channel_reduction,
            "layers": {
                name: {"ranks": ranks, "sensitivity": plan.sensitivity[name]}
                for name, ranks in chosen.items()
            },
        }
        return PruneOutcome(model, history, steps, info, structure=structure)

    def _rank_plan(self, model: nn.Module, x: Tensor, ignored: Sequence[nn.Module]) -> RankPlan:
        heads = [sub for layer in ignored for sub in layer.modules()]
        shapes = layer_shapes(model, x, skip=heads)
        sigmas = {name: spectra(model.get_submodule(name)) for name in shapes}
        return RankPlan(shapes, sigmas, count_macs_params(model, x))

    def _probe(
        self, model: nn.Module, plan: RankPlan, batches: list[tuple[Tensor, Tensor]], own: LowrankConfig
    ) -> None:
        """Each layer alone truncated to ``probe_energy``: the adversarial-loss rise, normalised."""
        base = adversarial_loss(model, batches, own.probe_attack)
        rises = {}
        for name in plan.shapes:
            original = model.get_submodule(name)
            chain, _ = factorize(original, ranks_at(plan.sigmas[name], own.probe_energy))
            model.set_submodule(name, chain)
            try:
                rises[name] = adversarial_loss(model, batches, own.probe_attack) - base
            finally:
                model.set_submodule(name, original)
        top = max(max(rises.values(), default=0.0), 1e-12)
        plan.sensitivity = {name: max(r, 0.0) / top for name, r in rises.items()}
        plan.protection = own.protection

    def _reachable(self, plan: RankPlan, budget: Budget, dense: float) -> None:
        smallest = budget.pick(*plan.cost(plan.plan(0.0)))
        if dense / max(smallest, 1.0) < budget.reduction * (1 - budget.tolerance):
            raise unreachable(budget, dense, smallest)

    def _search(self, plan: RankPlan, budget: Budget, dense: float) -> tuple[float, dict[str, list[int]]]:
        """Bisect the global energy share whose factorised cost is closest to the target."""
        self._reachable(plan, budget, dense)

        def error(energy: float) -> float:
            return budget.error(dense, budget.pick(*plan.cost(plan.plan(energy))))

        lo, hi = 0.0, 1.0  # lo reaches the target (fewest MACs), hi keeps everything
        best = min((lo, hi), key=error)
        for _ in range(40):
            mid = (lo + hi) / 2
            reduction = dense / max(budget.pick(*plan.cost(plan.plan(mid))), 1.0)
            best = min((best, mid), key=error)
            if reduction >= budget.reduction:
                lo = mid
            else:
                hi = mid
            if error(best) <= budget.tolerance / 8:
                break
        return best, plan.plan(best)
