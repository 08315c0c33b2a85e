"""The recipe's ``prune`` section: the budget, the method, and the bases of method sections.

``prune.method`` names a registered pruning method (``toolchain.pruning.methods``); a method
with settings reads its own sub-section (``prune.hydra``, ``prune.bap``, ...), typed by the
method's own file. A recipe that only sets ``prune.criterion`` keeps the iterative method.
Light to import: pydantic only, no torch (method sections are checked against the method
registry only when a recipe has one).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails

from toolchain.recipe_train import AttackConfig, Section, TrainConfig

Allocation = Literal["layer", "block", "global"]

#: In-the-loop adversarial training defaults to a cheap PGD-3 (the iterative method's scoring
#: attack); set a method's ``train.attack`` to change it.
PGD3 = AttackConfig(steps=3, step_size=3 / 255)


def reduction_met(achieved: float, target: float, tolerance: float) -> bool:
    """The one budget rule: a reduction factor ``target`` (dense / pruned) is met when
    ``achieved >= target * (1 - tolerance)``; more reduction than asked is still within budget,
    and a NaN never meets it."""
    return achieved >= target * (1 - tolerance)


class LatencyProbe(Section):
    """Where and how a latency budget is measured: the runtime, batch and threads it ships with."""

    runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="onnxruntime: the exported FP32 ONNX file; torch: the PyTorch model"
    )
    batch: int = Field(1, ge=1, description="batch size the latency is measured at")
    threads: int = Field(2, ge=1, description="intra-op threads of the runtime")
    iterations: int = Field(40, ge=5, description="timed calls per model and candidate")
    max_probes: int = Field(6, ge=1, description="candidate models the search may measure")


class PruneTarget(Section):
    """The budget, as a reduction factor (4.0 means a quarter of the dense MACs).

    ``latency_reduction`` is measured, not counted: the prune stage searches the MACs reduction
    whose pruned model runs that much faster on ``latency`` (runtime, batch, threads), hands it to
    the method as its budget, and times the method's model again (see
    :mod:`toolchain.pruning.latency_target`).
    """

    whole: ClassVar[bool] = True  # a written target replaces the default one, never merges
    macs_reduction: float | None = Field(
        None, gt=1.0, description="dense MACs / pruned MACs to reach (4.0: a quarter of the MACs left)"
    )
    params_reduction: float | None = Field(
        None, gt=1.0, description="dense parameters / pruned parameters to reach"
    )
    latency_reduction: float | None = Field(
        None,
        gt=1.0,
        description="measured speed-up to reach on `latency` (searched by timing exported candidates before"
        " the method runs)",
    )
    latency: LatencyProbe = LatencyProbe()

    @model_validator(mode="after")
    def _exactly_one(self) -> PruneTarget:
        given = [
            v for v in (self.macs_reduction, self.params_reduction, self.latency_reduction) if v is not None
        ]
        if len(given) != 1:
            raise ValueError("set exactly one of macs_reduction, params_reduction or latency_reduction")
        # The defaults are not a configuration: a run's recipe.yaml (every key written out)
        # loads back.
        if self.latency != LatencyProbe() and self.latency_reduction is None:
            raise ValueError(
                "prune.target.latency configures a latency_reduction target; set one or remove it"
            )
        return self

    @property
    def metric(self) -> Literal["macs", "params", "latency"]:
        if self.latency_reduction is not None:
            return "latency"
        return "macs" if self.macs_reduction is not None else "params"

    @property
    def reduction(self) -> float:
        given = (self.macs_reduction, self.params_reduction, self.latency_reduction)
        value = next(v for v in given if v is not None)  # the validator guarantees exactly one
        return float(value)

    def as_dict(self) -> dict[str, float]:
        """The target as the report records it: ``{"<metric>_reduction": factor}``."""
        return {f"{self.metric}_reduction": self.reduction}


class MethodSection(Section):
    """A method's own settings."""


class TrainingSection(MethodSection):
    """A method that trains inside pruning; ``train`` is that training (epochs, lr, loss, attack)."""

    train: TrainConfig = TrainConfig()


class PruneConfig(Section):
    """Structured (channel) pruning with torch-pruning's dependency graph.

    The budget (``target``, ``tolerance``, ``round_to``, ``max_layer_pruning``) applies to every
    method; ``criterion``, ``steps``, ``importance_batches`` and ``finetune_between`` configure
    the ``iterative`` method (``mrs`` uses the criterion too), and ``attack`` is the
    perturbation ``adv-taylor`` scores on. Methods that train inside pruning take everything,
    attack included, from their own ``train`` sub-section.

    A method with settings declares their type itself (its class's ``settings``, in its own
    file under :mod:`toolchain.pruning.methods`); the recipe writes them as ``prune.<method>``.
    Here such a section is only kept as written; before a run the pruning layer validates it
    with the method's type (:func:`toolchain.pruning.methods.check_sections`): an unknown key is
    an error, and so is the section of a method that is not selected, so a typo in ``method``
    cannot silently train the wrong thing.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = Field(
        "iterative",
        description="pruning method: iterative, hydra, bap, dnr, gated, mrs, lowrank (see Pruning methods)",
    )
    criterion: str = Field(
        "adv-taylor",
        description="channel score for iterative (and the channel step of mrs/lowrank): magnitude, taylor, "
        "adv-taylor, random",
    )
    target: PruneTarget = PruneTarget(macs_reduction=4.0)
    tolerance: float = Field(0.05, gt=0, lt=1, description="relative error allowed on target")
    steps: int = Field(3, ge=1, description="iterative pruning steps")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    importance_batches: int = Field(4, ge=1, description="batches to score channels on")
    attack: AttackConfig = PGD3
    finetune_between: TrainConfig = TrainConfig(epochs=1, lr=0.01, loss="pgd")
    bn_recalibration_batches: int = Field(
        20, ge=0, description="batches to re-estimate BatchNorm statistics on after pruning"
    )
    max_layer_pruning: float = Field(0.9, gt=0, lt=1, description="never remove more of a layer")
    ignored_layers: list[str] = Field(
        default_factory=list, description="layers (qualified names: net.conv2) whose output channels stay"
    )

    @model_validator(mode="after")
    def _extra_keys_are_sections(self) -> PruneConfig:
        # Any other key must be a method's section (a mapping); the pruning layer checks it
        # against the method registry before a run (toolchain.pruning.methods.check_sections).
        for name, raw in (self.__pydantic_extra__ or {}).items():
            if not isinstance(raw, dict):
                raise ValidationError.from_exception_data(
                    "PruneConfig", [InitErrorDetails(type="extra_forbidden", loc=(name,), input=raw)]
                )
        return self

    @property
    def sections(self) -> dict[str, dict[str, Any]]:
        """The method sections the recipe wrote (``prune.<method>``), as written."""
        return dict(self.__pydantic_extra__ or {})


#: The keys of ``prune`` that configure the iterative method's scoring and steps.
ITERATIVE_KEYS = frozenset({"criterion", "steps", "importance_batches", "finetune_between", "attack"})
