"""The recipe's ``prune`` section: the budget, the method, and one typed section per method.

``prune.method`` names a registered pruning method (``toolchain.pruning.methods``); each method
reads its own sub-section (``prune.hydra``, ``prune.bap``, ...), and setting the section of a
method that is not selected is an error, so a typo in ``method`` cannot silently train the
wrong thing. A recipe that only sets ``prune.criterion`` keeps the iterative method, as
before. Light to import: pydantic only, no torch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from toolchain.recipe_train import AttackConfig, Number, Section, TrainConfig

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
    macs_reduction: float | None = Field(None, gt=1.0)
    params_reduction: float | None = Field(None, gt=1.0)
    latency_reduction: float | None = Field(None, gt=1.0)
    latency: LatencyProbe = LatencyProbe()

    @model_validator(mode="after")
    def _exactly_one(self) -> PruneTarget:
        given = [
            v for v in (self.macs_reduction, self.params_reduction, self.latency_reduction) if v is not None
        ]
        if len(given) != 1:
            raise ValueError("set exactly one of macs_reduction, params_reduction or latency_reduction")
        if "latency" in self.model_fields_set and self.latency_reduction is None:
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


class HydraConfig(TrainingSection):
    """HYDRA (Sehwag et al. 2020): train one importance score per channel, weights frozen.

    ``train`` is the score-training phase: its ``lr`` is the scores' learning rate (no weight
    decay on scores), its ``loss`` the robust loss (TRADES in the paper). The kept weights are
    fine-tuned afterwards by the recipe's ``finetune`` section.
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.1, loss="trades", weight_decay=1e-4, attack=PGD3)
    train_bn: bool = Field(True, description="BatchNorm affine parameters train with the scores")
    allocation: Allocation = Field("layer", description="how the budget is split among groups")


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
    deepfool_steps: int = Field(5, ge=1)
    overshoot: float = Field(0.02, ge=0)
    candidates: int = Field(3, ge=1, description="classes DeepFool considers besides the true one")
    cutoff: Literal["batch-mean"] | Number = "batch-mean"
    scale: float = Field(1.0, gt=0, description="rho: perturbations are multiplied by this after the cutoff")

    @model_validator(mode="after")
    def _check(self) -> BapConfig:
        if self.end <= self.begin:
            raise ValueError(f"end ({self.end}) must come after begin ({self.begin})")
        if isinstance(self.cutoff, float) and self.cutoff <= 0:
            raise ValueError(f"cutoff must be 'batch-mean' or a positive RMS norm, got {self.cutoff}")
        return self


class DnrConfig(TrainingSection):
    """DNR (Kundu et al. 2021): one training run to the budget, dropping and regrowing channels.

    Every ``update_every`` steps until ``rewire_until`` (fraction of the steps), each group
    drops ``drop_fraction`` (cosine-decayed) of its live channels with the smallest weight
    norm; the freed budget is regrown where the momentum of the mask gradient is largest,
    layers sharing in proportion to their normalised mean momentum. No fine-tune phase is
    needed after it (set the recipe's ``finetune.epochs`` to 0 to spend the budget here).
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.02, loss="hybrid", attack=PGD3)
    update_every: int = Field(20, ge=1, description="steps between rewiring")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="fraction of live channels dropped at first")
    rewire_until: float = Field(0.75, gt=0, le=1, description="fraction of steps; the mask is fixed after")
    momentum: float = Field(0.9, ge=0, lt=1, description="decay of the mask-gradient momentum")
    allocation: Allocation = Field("layer", description="the starting mask's split of the budget")


class GatedConfig(TrainingSection):
    """Gated mixed-noise pruning (our design from Luo et al. 2023's abstract).

    Per-channel gates ``sigmoid(a)`` train with the weights on ``train`` (``loss: mixed``
    normally), pulled down by ``l1`` and by the contribution-difference loss (weight
    ``contribution_weight``), which penalises gates on channels whose contribution changes
    most between clean and perturbed inputs. At the end the top channels by gate times
    feature stability are kept under the budget (``allocation``) and the rest removed.
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.01, loss="mixed", attack=PGD3)
    gate_lr: Number = Field(0.02, gt=0, description="Adam learning rate of the gate logits")
    gate_init: float = Field(3.0, description="initial gate logit (sigmoid(3) = 0.95)")
    l1: Number = Field(5e-4, ge=0, description="weight of the L1 pull on the gates (per channel)")
    contribution_weight: Number = Field(1.0, ge=0, description="weight of the contribution-difference loss")
    allocation: Allocation = Field("layer", description="layer-wise, block-wise or global competition")
    block_depth: int = Field(3, ge=1, description="'block': groups whose root names share this many parts")


class MrsConfig(MethodSection):
    """MRPF's module robustness sensitivity (our design from the abstract).

    Each group is probed by removing ``probe_ratio`` of its channels (lowest by
    ``prune.criterion``) and measuring the rise of the adversarial loss (``probe_attack``
    crafted against the probed model, on ``probe_batches`` batches). The most sensitive group
    then loses ``1 - protection`` times the fraction the least sensitive one loses; one common
    scale is bisected to meet the budget. Adversarial fine-tuning is the recipe's ``finetune``.
    """

    probe_ratio: float = Field(
        0.3, gt=0, lt=1, description="fraction of a group's channels removed to probe it"
    )
    probe_batches: int = Field(2, ge=1, description="batches the adversarial loss is measured on")
    probe_attack: AttackConfig = PGD3
    protection: float = Field(0.8, ge=0, lt=1, description="how much the most sensitive group is spared")


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

    scoring: Literal["energy", "robust"] = "energy"
    channel_reduction: float | None = Field(None, gt=1.0, description="prune channels to this first")
    probe_energy: float = Field(0.9, gt=0, lt=1, description="robust scoring: energy kept when probing")
    probe_batches: int = Field(2, ge=1)
    probe_attack: AttackConfig = PGD3
    protection: float = Field(
        0.8, ge=0, lt=1, description="robust scoring: how much sensitive layers are spared"
    )


class PruneConfig(Section):
    """Structured (channel) pruning with torch-pruning's dependency graph.

    The budget (``target``, ``tolerance``, ``round_to``, ``max_layer_pruning``) applies to every
    method; ``criterion``, ``steps``, ``importance_batches`` and ``finetune_between`` configure
    the ``iterative`` method (``mrs`` uses the criterion too), and ``attack`` is the
    perturbation ``adv-taylor`` scores on. Methods that train inside pruning take everything,
    attack included, from their own ``train`` sub-section.
    """

    method: str = "iterative"
    criterion: str = "adv-taylor"
    target: PruneTarget = PruneTarget(macs_reduction=4.0)
    tolerance: float = Field(0.05, gt=0, lt=1, description="relative error allowed on target")
    steps: int = Field(3, ge=1, description="iterative pruning steps")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    importance_batches: int = Field(4, ge=1, description="batches to score channels on")
    attack: AttackConfig = PGD3
    finetune_between: TrainConfig = TrainConfig(epochs=1, lr=0.01, loss="pgd")
    bn_recalibration_batches: int = Field(20, ge=0)
    max_layer_pruning: float = Field(0.9, gt=0, lt=1, description="never remove more of a layer")
    ignored_layers: list[str] = Field(
        default_factory=list, description="layers (qualified names: net.conv2) whose output channels stay"
    )
    hydra: HydraConfig | None = None
    bap: BapConfig | None = None
    dnr: DnrConfig | None = None
    gated: GatedConfig | None = None
    mrs: MrsConfig | None = None
    lowrank: LowrankConfig | None = None

    @model_validator(mode="after")
    def _sections_match_method(self) -> PruneConfig:
        for name in METHOD_SECTIONS:
            if getattr(self, name) is not None and name != self.method:
                raise ValueError(
                    f"prune.{name} is set but prune.method is {self.method!r}; "
                    f"set prune.method: {name} or remove the prune.{name} section"
                )
        if self.method in METHOD_SECTIONS:  # an unknown name is reported with the known ones later
            stray = sorted((ITERATIVE_KEYS - CRITERION_KEYS.get(self.method, set())) & self.model_fields_set)
            if stray:
                raise ValueError(
                    f"prune.{stray[0]} configures the iterative method, not {self.method!r}; remove it"
                )
        return self

    def section(self) -> MethodSection | None:
        """The selected method's own settings (its defaults when the recipe leaves them out)."""
        if self.method not in METHOD_SECTIONS:
            return None
        value = getattr(self, self.method)
        return value if value is not None else METHOD_SECTIONS[self.method]()


#: Methods with a typed sub-section of ``prune``; the key is the method's registered name.
METHOD_SECTIONS: dict[str, type[MethodSection]] = {
    "hydra": HydraConfig,
    "bap": BapConfig,
    "dnr": DnrConfig,
    "gated": GatedConfig,
    "mrs": MrsConfig,
    "lowrank": LowrankConfig,
}
ITERATIVE_KEYS = frozenset({"criterion", "steps", "importance_batches", "finetune_between", "attack"})
#: Methods that rank channels inside a group with ``prune.criterion`` (and its scoring keys).
CRITERION_KEYS: dict[str, set[str]] = {
    "mrs": {"criterion", "importance_batches", "attack"},
    "lowrank": {"criterion", "importance_batches", "attack"},
}
