"""Recipe sections shared by training and pruning: the perturbation and the training loop.

Split from :mod:`toolchain.recipe` so the pruning sections (:mod:`toolchain.recipe_prune`) can
use them without an import cycle; :mod:`toolchain.recipe` re-exports everything here. Light to
import: pydantic only, no torch.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _parse_number(value: Any) -> Any:
    """Accept ``8/255`` style fractions for eps and step sizes (YAML reads them as strings)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction like 8/255") from None
    return value


Number = Annotated[float, BeforeValidator(_parse_number)]


class Section(BaseModel):
    """A recipe section: unknown keys are errors, values are immutable.

    A partly written sub-section keeps the parent's defaults for the keys it leaves out:
    ``finetune: {epochs: 5}`` keeps fine-tuning's own ``lr: 0.01`` rather than falling back to
    the generic training default, and ``prune.attack: {eps: 0.1}`` keeps PGD-3. A section whose
    keys only make sense together (a budget: one of several factors) sets ``whole = True`` and
    is replaced, not merged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    whole: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _inherit_nested_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            default, value = field.default, data.get(name)
            if (
                isinstance(default, BaseModel)
                and isinstance(value, dict)
                and not getattr(default, "whole", False)
            ):
                merged[name] = _deep_merge(default.model_dump(exclude_defaults=True), value)
        return merged


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def check_budget(eps: float, norm: str) -> None:
    """Pixels live in [0, 1]: an L-inf budget above 1 (``8`` meant as ``8/255``) perturbs nothing
    more than 1 does and is always a slip.

    Raises:
        ValueError: ``eps`` is not positive, or above 1 for L-inf.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"L-inf eps {eps:g} exceeds the [0, 1] pixel range; write it as a fraction: 8/255")


class AttackConfig(Section):
    """An L-inf (or L2) PGD-style perturbation used for training or evaluation."""

    eps: Number = Field(
        8 / 255,
        description="perturbation budget in pixel units ([0, 1] pixels: write 8/255, not 8); > 0 and, for "
        "linf, at most 1",
    )
    step_size: Number = Field(2 / 255, gt=0, description="size of each PGD step")
    steps: int = Field(
        10, ge=0, description="PGD steps (1 with a random start is single-step 'fast' adversarial training)"
    )
    norm: Literal["linf", "l2"] = Field(
        "linf", description="the threat model: L-inf or L2 ball around the image"
    )
    random_start: bool = Field(True, description="start from a random point inside the ball")

    @model_validator(mode="after")
    def _budget_in_range(self) -> AttackConfig:
        check_budget(self.eps, self.norm)
        return self


#: Corruptions the mixed-noise loss draws from by default: the road conditions a driving model
#: meets (weather, glare, night, motion, sensor noise), one or two per family.
DEFAULT_MIXED_CORRUPTIONS = (
    "fog",
    "rain",
    "snow",
    "sun_glare",
    "low_light",
    "motion_blur",
    "defocus_blur",
    "gaussian_noise",
    "jpeg_compression",
    "contrast",
)


class MixedNoiseConfig(Section):
    """How a ``loss: mixed`` batch is split among kinds of samples (fractions summing to 1).

    ``fgsm`` and ``pgd`` use the train section's ``attack``; ``corruption`` draws a random
    corruption from ``corruptions`` at a random severity from ``severities`` for each image;
    ``generator`` uses a small convolutional network trained alongside the model to maximise
    its loss under the attack's L-inf budget (Luo et al. 2023's learned perturbation).
    """

    clean: float = Field(0.25, ge=0, le=1, description="share of clean images in each batch")
    fgsm: float = Field(
        0.0, ge=0, le=1, description="share of FGSM examples (made with the section's attack)"
    )
    pgd: float = Field(0.25, ge=0, le=1, description="share of PGD examples (made with the section's attack)")
    corruption: float = Field(
        0.25,
        ge=0,
        le=1,
        description="share of corrupted images (a random corruption of `corruptions` at a random severity)",
    )
    generator: float = Field(
        0.25, ge=0, le=1, description="share of images perturbed by the learned generator"
    )
    corruptions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MIXED_CORRUPTIONS),
        description="corruptions the corrupted share draws from (`robustprune corruptions --list`)",
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description="severities (1..5) the corrupted share draws from",
    )
    generator_lr: Number = Field(1e-3, gt=0, description="Adam learning rate of the perturbation generator")
    generator_width: int = Field(16, ge=1, description="channels of the generator's hidden layers")

    @model_validator(mode="after")
    def _check(self) -> MixedNoiseConfig:
        total = self.clean + self.fgsm + self.pgd + self.corruption + self.generator
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"clean + fgsm + pgd + corruption + generator must sum to 1, got {total:g}")
        if self.corruption > 0 and not self.corruptions:
            raise ValueError("corruption > 0 needs at least one name in corruptions")
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad or not self.severities:
            raise ValueError(f"severities must be a non-empty list of 1..5, got {self.severities}")
        return self


class DistillConfig(Section):
    """Distillation from the dense model for ``loss: ard`` and ``loss: rslad`` (fine-tuning and a
    pruning method's training; the dense model's own training has no teacher).

    ARD (Goldblum et al. 2020): ``w * T^2 * KL(teacher(x)/T || student(x_adv)/T) + (1 - w) *
    CE(student(x), y)``, ``x_adv`` from the section's attack. RSLAD (Zi et al. 2021): the
    teacher's soft labels replace the hard labels in the attack and in both terms. Either adds
    ``corruption_weight * T^2 * KL(teacher(x_c)/T || student(x_c)/T)`` on randomly corrupted
    images ``x_c`` when that weight is above 0.
    """

    adv_weight: float = Field(
        5 / 6,
        ge=0,
        le=1,
        description="w: weight of the adversarial term; 1 - w on the clean term (RSLAD: 5/6)",
    )
    temperature: Number = Field(1.0, gt=0, description="T: softens both predictions (RSLAD: 1)")
    corruption_weight: Number = Field(
        0.0, ge=0, description="weight of the consistency term on corrupted images (0: off)"
    )
    corruptions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MIXED_CORRUPTIONS),
        description="corruptions the consistency term draws from (`robustprune corruptions --list`)",
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5], description="severities (1..5) it draws from"
    )

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.corruption_weight > 0 and not self.corruptions:
            raise ValueError("corruption_weight > 0 needs at least one name in corruptions")
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad or not self.severities:
            raise ValueError(f"severities must be a non-empty list of 1..5, got {self.severities}")
        return self


class TrainConfig(Section):
    """A training loop; also the shape of ``finetune`` and of in-the-loop method training."""

    epochs: int = Field(5, ge=0, description="training epochs (0 skips the stage's training)")
    lr: Number = Field(0.05, gt=0, description="peak learning rate of SGD")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: Number = Field(5e-4, ge=0, description="L2 weight decay")
    loss: Literal["clean", "pgd", "trades", "hybrid", "mixed", "ard", "rslad"] = Field(
        "pgd",
        description="clean, pgd (Madry PGD-AT), trades (Zhang et al. 2019), hybrid ((1-w)*CE(clean) + "
        "w*CE(adversarial)), mixed (mixed-noise batches, see `mixed`), or distillation from the dense "
        "model: ard (Goldblum et al. 2020) or rslad (Zi et al. 2021), see `distill`",
    )
    trades_beta: float = Field(6.0, ge=0, description="TRADES beta: weight of the KL term")
    adv_weight: float = Field(
        0.5, ge=0, le=1, description="hybrid loss: (1 - w) * CE(clean) + w * CE(adversarial)"
    )
    mixed: MixedNoiseConfig = MixedNoiseConfig()
    distill: DistillConfig = DistillConfig()
    attack: AttackConfig = AttackConfig()
    schedule: Literal["cosine", "constant", "onecycle"] = Field(
        "cosine",
        description="learning-rate schedule: cosine, constant, or onecycle (torch's OneCycleLR: up from "
        "lr/25 over the first 30% of steps, then cosine down)",
    )
    cycle_momentum: bool = Field(
        True,
        description="onecycle only: SGD momentum falls from 0.95 to 0.85 while the lr rises and climbs back "
        "while it falls, as torch's OneCycleLR does by default (`momentum` is then not used); false keeps "
        "`momentum` fixed",
    )
    lr_warmup_epochs: float = Field(0, ge=0, description="linear learning-rate warm-up (cosine/constant)")
    warmup_epochs: int = Field(0, ge=0, description="clean epochs before adversarial ones")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision on CUDA (ignored on CPU)")
    sync_batchnorm: bool = Field(
        False,
        description="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self
