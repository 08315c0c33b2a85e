"""The segmentation suite: clean, corruptions, white-box and transfer attacks, on every runner.

As the classification suite (:mod:`toolchain.robustness.suite`), one pass over the validation
batches evaluates a model on all its runners: corrupted images are made once per batch and fed
to every runner, and adversarial examples are crafted once on the PyTorch model and replayed on
every engine (mode ``transfer``). What is kept per runner is a confusion matrix per condition
(clean, each attack, each corruption and severity), so memory does not grow with the images.

Differences from classification, all per pixel: every image is attacked (there is no
"correctly classified image" to restrict to; a pixel already wrong stays counted as wrong),
the attacks are PGD, FGSM and APGD-CE on the mean per-pixel cross-entropy over the labelled
pixels, and SegPGD (:mod:`toolchain.robustness.attacks.segpgd`); parity counts agreeing
pixels, and a pixel with a NaN or Inf logit counts as misclassified. A pixel where an engine
picks another class at a near-tie that its logit difference explains
(:func:`exporters.parity.tie_flips`; bilinear upsampling makes the logits of two classes
cross exactly at every boundary) counts as agreeing and is counted in ``parity.ties``. There
are no black-box attacks for segmentation (Square, APGD-T and AutoAttack are defined on one
label per image and are refused).
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from exporters.base import Runner
from exporters.parity import tie_flips
from toolchain.errors import UserError
from toolchain.recipe import EvalAttackConfig, ValidateConfig
from toolchain.report.schema import AttackRow, Corruptions, Evaluation, Parity, RobustMiou, Skipped
from toolchain.robustness import sanity
from toolchain.robustness.attacks.apgd import APGD
from toolchain.robustness.attacks.pgd import pgd_attack
from toolchain.robustness.attacks.segpgd import segpgd_attack
from toolchain.robustness.corruptions import corrupt
from toolchain.robustness.seg_metrics import class_iou, confusion, mean_iou, pixel_accuracy

log = logging.getLogger(__name__)

#: ``craft(model, x, y) -> x_adv``
Craft = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_STEPS = 20


@dataclass(frozen=True)
class SegAttack:
    """One white-box attack of the suite: its key, report fields and how to craft examples."""

    key: str
    name: str
    norm: str
    eps: float
    steps: int
    samples: int | None
    craft: Craft


def _pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalAttackConfig, **common: Any
) -> torch.Tensor:
    return pgd_attack(model, x, y, restarts=cfg.restarts, **common)


def _segpgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalAttackConfig, **common: Any
) -> torch.Tensor:
    return segpgd_attack(model, x, y, **common)


def _fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalAttackConfig, **common: Any
) -> torch.Tensor:
    """One signed-gradient step of size eps on the mean per-pixel cross-entropy (Goodfellow et
    al. 2015 per pixel): PGD with one step, no random start."""
    return pgd_attack(model, x, y, eps=common["eps"], step_size=common["eps"], steps=1, random_start=False)


def _apgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalAttackConfig, **common: Any
) -> torch.Tensor:
    """APGD-CE (Croce & Hein 2020) on each image's mean per-pixel cross-entropy over its
    labelled pixels, with our classification APGD's per-image step-size schedule; each image
    keeps its highest-loss point."""
    attack = APGD(eps=common["eps"], norm=common["norm"], steps=common["steps"], restarts=cfg.restarts)
    return attack.attack_every_image(model, x, y, common["generator"], highest_loss=True)


#: ``validate.attacks[].name`` -> how the suite crafts it and its default steps (the names
#: ``Segmentation`` accepts; FGSM is one step by definition).
_CRAFTERS: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
    "pgd": (_pgd, DEFAULT_STEPS),
    "segpgd": (_segpgd, DEFAULT_STEPS),
    "fgsm": (_fgsm, 1),
    "apgd": (_apgd, 100),
}
#: Attacks of the classification suite that are not defined per pixel, and why.
_REFUSED = {
    "square": "Square is a black-box search for one image-level misclassification",
    "apgd-t": "APGD-T targets one class per image",
    "autoattack-lite": "AutoAttack's targeted and black-box parts are defined per image",
    "autoattack": "the reference AutoAttack code classifies whole images",
}


def _craft(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cfg: EvalAttackConfig, steps: int, step_size: float
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(cfg.seed)  # the same random start for every model
    common = {
        "eps": cfg.eps,
        "step_size": step_size,
        "steps": steps,
        "norm": cfg.norm,
        "generator": generator,
    }
    return _CRAFTERS[cfg.name][0](model, x, y, cfg, **common)


def build_seg_attacks(cfgs: Sequence[EvalAttackConfig]) -> list[SegAttack]:
    """The validate section's attacks for a segmentation model (``pgd``, ``segpgd``, ``fgsm``,
    ``apgd``).

    ``steps`` defaults to 20 (``apgd``: 100; ``fgsm``: always 1) and ``step_size`` to
    ``2.5 * eps / steps`` (as for PGD; ``apgd`` adapts its own, ``fgsm`` steps by eps).

    Raises:
        UserError: an attack that is not defined for segmentation, or FGSM under L2.
    """
    built = []
    for i, cfg in enumerate(cfgs):
        if cfg.name not in _CRAFTERS:
            why = f" ({_REFUSED[cfg.name]})" if cfg.name in _REFUSED else ""
            raise UserError(
                f"validate.attacks: {cfg.name!r} is not a segmentation attack{why}; use "
                f"{', '.join(_CRAFTERS)}"
            )
        if cfg.name == "fgsm" and cfg.norm != "linf":
            raise UserError("validate.attacks: 'fgsm' is an L-inf attack; use norm: linf, or pgd for l2")
        default = _CRAFTERS[cfg.name][1]
        steps = 1 if cfg.name == "fgsm" else cfg.steps if cfg.steps is not None else default
        step_size = cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / max(steps, 1)
        craft = functools.partial(_craft, cfg=cfg, steps=steps, step_size=step_size)
        built.append(
            SegAttack(f"attack{i}:{cfg.name}", cfg.name, cfg.norm, cfg.eps, steps, cfg.samples, craft)
        )
    return built


@dataclass
class _Counts:
    """One runner's confusion matrices (``tables``: ``"clean"``, an attack's key or
    ``"<corruption>:<severity>"``) and parity counters, accumulated batch by batch."""

    classes: int
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    attack_images: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    images: int = 0
    nonfinite: int = 0
    max_abs_diff: float = 0.0
    agree: int = 0
    compared: int = 0
    parity_nonfinite: int = 0
    ties: int = 0

    def predict(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Arg-max per pixel; a pixel with a NaN or Inf logit is made wrong on purpose."""
        finite = torch.isfinite(logits).all(dim=1)
        self.nonfinite += int((~finite).flatten(1).any(1).sum())
        wrong = (y.clamp(max=self.classes - 1) + 1) % self.classes
        return torch.where(finite, logits.argmax(1), wrong)

    def add(self, key: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        counts = confusion(self.predict(logits, y), y, self.classes)
        self.tables[key] = self.tables[key] + counts if key in self.tables else counts

    def compare(self, logits: torch.Tensor, reference: torch.Tensor) -> None:
        finite = torch.isfinite(logits).all(dim=1) & torch.isfinite(reference).all(dim=1)
        self.parity_nonfinite += int((~finite).flatten(1).any(1).sum())
        if finite.any():
            diff = (logits - reference).abs().amax(1)[finite]
            self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        tied = tie_flips(reference, logits) & finite
        self.ties += int(tied.sum())
        self.agree += int((((logits.argmax(1) == reference.argmax(1)) | tied) & finite).sum())
        self.compared += finite.numel()


def evaluate_segmentation(
    model: nn.Module | None,
    runners: Mapping[str, Runner],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: ValidateConfig,
    *,
    model_name: str,
    class_names: Sequence[str],
    progress: bool = True,
) -> list[Evaluation]:
    """Run the validate section on one segmentation model and each of its runners.

    Args:
        model: the PyTorch model the runners were made from (white-box attacks are crafted on
            it; the parity reference); ``None`` for a bare engine (attacks then skipped).
        runners: runtime name to runner.
        batches: ``(x, y)`` with ``y`` the ``N x H x W`` labels (255 = ignore).
        cfg: the recipe's validate section (attack names: ``pgd``, ``segpgd``, ``fgsm``, ``apgd``).
        model_name: ``"dense"`` or ``"pruned"``.
        class_names: one name per class, in logit order.

    Returns:
        One evaluation per runner.
    """
    if model is not None:
        model.eval()
    attacks = build_seg_attacks(list(cfg.attacks))
    skipped = [
        Skipped(name=a.name, reason="white-box attacks need the PyTorch model")
        for a in attacks
        if model is None
    ]
    attacks = attacks if model is not None else []
    counts = {name: _Counts(len(class_names)) for name in runners}
    flags: dict[str, set[str]] = {name: set() for name in runners}
    seen = 0
    bar = tqdm(batches, desc=f"validate {model_name}", leave=False, disable=None if progress else True)
    for batch_index, (x, y) in enumerate(bar):
        clean = _clean(model, runners, counts, flags, x, y, first=batch_index == 0)
        for attack in attacks:
            upto = len(x) if attack.samples is None else max(min(attack.samples - seen, len(x)), 0)
            if upto:
                assert model is not None
                x_adv = attack.craft(model, x[:upto], y[:upto])
                for name, runner in runners.items():
                    counts[name].add(attack.key, runner(x_adv), y[:upto])
                    # The same images clean, so an attack's mIoU has its own baseline.
                    counts[name].add(f"{attack.key}:clean", clean[name][:upto], y[:upto])
                    counts[name].attack_images[attack.key] += upto
        for cname in cfg.corruptions.names:
            for severity in cfg.corruptions.severities:
                xc = corrupt(cname, x, severity, seed=cfg.corruptions.seed * 1_000_003 + batch_index)
                for name, runner in runners.items():
                    counts[name].add(f"{cname}:{severity}", runner(xc), y)
        seen += len(x)
    return [
        _evaluation(
            model_name, runner, counts[name], flags[name], attacks, cfg, class_names, model is not None
        ).model_copy(update={"skipped": skipped or None})
        for name, runner in runners.items()
    ]


def _clean(
    model: nn.Module | None,
    runners: Mapping[str, Runner],
    counts: dict[str, _Counts],
    flags: dict[str, set[str]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    first: bool,
) -> dict[str, torch.Tensor]:
    """Clean confusion and parity of every runner; returns each runner's clean logits."""
    reference = None
    outputs = {}
    if model is not None:
        with torch.no_grad():
            reference = model(x).detach().float()
    for name, runner in runners.items():
        logits = outputs[name] = runner(x)
        counts[name].images += len(x)
        counts[name].add("clean", logits, y)
        if reference is not None:
            counts[name].compare(logits, reference)
    if first:
        sanity.first_batch_flags(model, runners, x, y, outputs, flags)
    return outputs


def _per_corruption(
    counts: _Counts, cfg: ValidateConfig, score: Callable[[torch.Tensor], float]
) -> dict[str, dict[str, float]]:
    return {
        cname: {str(s): score(counts.tables[f"{cname}:{s}"]) for s in cfg.corruptions.severities}
        for cname in cfg.corruptions.names
    }


def _mean(per: dict[str, dict[str, float]]) -> float | None:
    values = [v for by_sev in per.values() for v in by_sev.values()]
    return sum(values) / len(values) if values else None


def _evaluation(
    model_name: str,
    runner: Runner,
    counts: _Counts,
    flags: set[str],
    attacks: list[SegAttack],
    cfg: ValidateConfig,
    class_names: Sequence[str],
    has_reference: bool,
) -> Evaluation:
    is_reference = runner.runtime == "torch"
    parity = None
    if has_reference:
        parity = Parity(
            reference="torch",
            max_abs_diff=None if counts.parity_nonfinite else counts.max_abs_diff,
            top1_agreement=counts.agree / max(counts.compared, 1),
            compared=counts.compared,
            nonfinite=counts.parity_nonfinite,
            ties=counts.ties,
        )
        if not is_reference and counts.compared:
            flag = sanity.check_engine_agreement(parity.top1_agreement, runner.precision)
            flags |= {flag} if flag else set()
    rows = [
        AttackRow(
            name=a.name,
            mode="white-box" if is_reference else "transfer",
            norm=a.norm,
            eps=a.eps,
            steps=a.steps,
            samples=counts.attack_images[a.key],
            accuracy=pixel_accuracy(counts.tables[a.key]),
            miou=mean_iou(counts.tables[a.key]),
            clean_miou=mean_iou(counts.tables[f"{a.key}:clean"]),
        )
        for a in attacks
        if a.key in counts.tables
    ]
    budgets: dict[tuple[str, float], list[AttackRow]] = defaultdict(list)
    for row in rows:
        budgets[(row.norm, row.eps)].append(row)
    robust = [
        RobustMiou(
            norm=norm,
            eps=eps,
            miou=min(r.miou or 0.0 for r in group),
            samples=min(r.samples for r in group),
            attacks=[r.name for r in group],
        )
        for (norm, eps), group in budgets.items()
    ]
    corruptions = Corruptions()
    if cfg.corruptions.names:
        accuracy, miou = _per_corruption(counts, cfg, pixel_accuracy), _per_corruption(counts, cfg, mean_iou)
        corruptions = Corruptions(
            per_corruption=accuracy,
            mean_accuracy=_mean(accuracy),
            per_corruption_miou=miou,
            mean_miou=_mean(miou),
        )
    return Evaluation(
        model=model_name,
        runtime=runner.runtime,
        precision=runner.precision,
        device=runner.device,
        samples=counts.images,
        task="segmentation",
        clean_accuracy=pixel_accuracy(counts.tables["clean"]),
        pixel_accuracy=pixel_accuracy(counts.tables["clean"]),
        miou=mean_iou(counts.tables["clean"]),
        per_class_iou=dict(zip(class_names, class_iou(counts.tables["clean"]))),
        corruptions=corruptions,
        attacks=rows,
        robust_miou=robust,
        parity=parity,
        nonfinite_logits=counts.nonfinite,
        flags=sorted(flags),
    )
