"""``classification``: one label per image (the default task).

Robust accuracy is counted as the field defines it (AutoAttack): attacks run only on the
images the model classifies correctly, and an image counts as robust against an attack only if
the runner classifies it correctly clean, the attack was run on it, and the runner still
classifies the attacked image correctly. Per budget ``(norm, eps)`` the evaluation's
``robust_accuracy`` is the per-image worst case over every attack run at that budget, on the
images all of them saw: attacks with a ``samples`` cap see the first ``cap`` images of the
stream, so the common images are the first ``min(cap)``. Only booleans per image and counters
are kept, never the images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from toolchain.errors import UserError
from toolchain.report.schema import AttackRow, Corruptions, Evaluation, Parity, RobustAccuracy
from toolchain.tasks.base import TASKS, AttackSpec, Evaluator, Labels, Objective, Output, Task, finite_images

if TYPE_CHECKING:
    from toolchain.recipe import ValidateConfig


def share(mask: torch.Tensor) -> float:
    """The fraction of ``True`` in a boolean mask, exactly (``k / n``, not a float32 mean); 0.0 if empty."""
    return int(mask.sum()) / len(mask) if len(mask) else 0.0


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 correct per image; an image with a NaN or Inf logit is never correct."""
    return (logits.argmax(1) == y) & finite_images(logits)


class ClassificationObjective(Objective):
    """Cross-entropy, batch-mean KL, top-1 fooling; attacks run on correctly classified images."""

    def loss(self, out: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(out, y, reduction=reduction)

    def divergence(self, out: Output, reference: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """KL per image, summed over classes; ``mean`` over the batch (``batchmean``) or ``sum``."""
        return F.kl_div(
            F.log_softmax(out, dim=1),
            F.softmax(reference, dim=1),
            reduction="batchmean" if reduction == "mean" else "sum",
        )

    def fooled(self, out: Output, y: Labels) -> torch.Tensor:
        return out.argmax(1) != y

    def attackable(self, out: Output, y: Labels) -> torch.Tensor:
        # AutoAttack's rule: a misclassified image is not robust already, and an attack's
        # iterate that happens to land on its label must never make it count as robust.
        return correct(out, y)

    def hits(self, out: Output, y: Labels) -> tuple[int, int]:
        return int((out.argmax(1) == y).sum()), len(y)

    def margin(self, out: Output, y: Labels) -> torch.Tensor:
        """``logit[y] - max_{j != y} logit[j]`` per image: positive while correctly classified."""
        true = out.gather(1, y.view(-1, 1)).squeeze(1)
        other = out.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
        return true - other


class ClassificationEvaluator(Evaluator):
    """Per image: clean correctness and, per attack, whether it survived; per corruption and
    severity: counts; parity: top-1 agreement and the largest logit difference."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names)
        self._clean: list[torch.Tensor] = []
        self._batch_clean = torch.zeros(0, dtype=torch.bool)
        self._robust: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._queries: dict[str, int] = defaultdict(int)
        self._corrupt_right: dict[str, int] = defaultdict(int)
        self._corrupt_seen: dict[str, int] = defaultdict(int)
        self._max_abs_diff = 0.0
        self._agree = self._compared = self._parity_nonfinite = 0

    def clean(self, out: Output, y: Labels) -> None:
        self.observe(out)
        self._batch_clean = correct(out, y).cpu()
        self._clean.append(self._batch_clean)

    def compare(self, out: Output, reference: Output) -> None:
        """A NaN or Inf on either side is a disagreement, and makes ``max_abs_diff`` undefined
        (never silently 0)."""
        finite = finite_images(out) & finite_images(reference)
        self._parity_nonfinite += int((~finite).sum())
        if finite.any():
            self._max_abs_diff = max(self._max_abs_diff, float((out[finite] - reference[finite]).abs().max()))
        self._agree += int(((out.argmax(1) == reference.argmax(1)) & finite).sum())
        self._compared += len(out)

    def attacked(
        self, spec: AttackSpec, out: Output, y: Labels, crafted_on: torch.Tensor | None, queries: int
    ) -> None:
        self.observe(out)
        n = len(y)
        robust = self._batch_clean[:n] & correct(out, y).cpu()
        if crafted_on is not None:
            robust &= crafted_on[:n].cpu()
        self._robust[spec.key].append(robust)
        self._queries[spec.key] += queries

    def corrupted(self, key: str, out: Output, y: Labels) -> None:
        self.observe(out)
        self._corrupt_right[key] += int(correct(out, y).sum())
        self._corrupt_seen[key] += len(y)

    def survived(self, key: str) -> torch.Tensor | None:
        parts = self._robust.get(key, [])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def evaluation(
        self,
        common: dict[str, Any],
        specs: Sequence[AttackSpec],
        cfg: ValidateConfig,
        *,
        is_reference: bool,
        has_reference: bool,
    ) -> Evaluation:
        clean = torch.cat(self._clean) if self._clean else torch.zeros(0, dtype=torch.bool)
        return Evaluation(
            **common,
            samples=len(clean),
            clean_accuracy=share(clean),
            corruptions=self._corruptions(list(cfg.corruptions.names), list(cfg.corruptions.severities)),
            attacks=self._attack_rows(specs, is_reference),
            robust_accuracy=self._robust_accuracy(specs),
            parity=self._parity() if has_reference else None,
            nonfinite_logits=self.nonfinite,
        )

    def _parity(self) -> Parity:
        return Parity(
            reference="torch",
            max_abs_diff=None if self._parity_nonfinite else self._max_abs_diff,
            top1_agreement=self._agree / max(self._compared, 1),
            compared=self._compared,
            nonfinite=self._parity_nonfinite,
        )

    def _attack_rows(self, specs: Sequence[AttackSpec], is_reference: bool) -> list[AttackRow]:
        rows = []
        for spec in specs:
            mask = self.survived(spec.key)
            if mask is None or len(mask) == 0:
                continue
            rows.append(
                AttackRow(
                    name=spec.name,
                    mode=spec.mode_on(is_reference),  # type: ignore[arg-type]
                    norm=spec.norm,
                    eps=spec.eps,
                    steps=spec.steps if spec.mode == "white-box" else 0,
                    queries=round(self._queries[spec.key] / len(mask), 2),
                    samples=len(mask),
                    accuracy=share(mask),
                    ensemble=spec.ensemble,
                )
            )
        return rows

    def _robust_accuracy(self, specs: Sequence[AttackSpec]) -> list[RobustAccuracy]:
        """Per budget: images that survive every attack run at it, on the images all saw."""
        entries = []
        for (norm, eps), group in budgets(specs).items():
            ran = [s for s in group if len(self._mask(s.key))]
            if not ran:
                continue
            common = min(len(self._mask(s.key)) for s in ran)
            robust = worst_case([self._mask(s.key) for s in ran], common)
            entries.append(
                RobustAccuracy(
                    norm=norm, eps=eps, accuracy=share(robust), samples=common, attacks=[s.name for s in ran]
                )
            )
        return entries

    def _mask(self, key: str) -> torch.Tensor:
        mask = self.survived(key)
        return mask if mask is not None else torch.zeros(0, dtype=torch.bool)

    def _corruptions(self, names: list[str], severities: list[int]) -> Corruptions:
        """Accuracy per corruption and severity, and their mean."""
        if not names:
            return Corruptions()
        per = {
            name: {
                str(s): self._corrupt_right[f"{name}:{s}"] / max(self._corrupt_seen[f"{name}:{s}"], 1)
                for s in severities
            }
            for name in names
        }
        values = [a for by_sev in per.values() for a in by_sev.values()]
        return Corruptions(per_corruption=per, mean_accuracy=sum(values) / len(values) if values else None)


def budgets(specs: Sequence[AttackSpec]) -> dict[tuple[str, float], list[AttackSpec]]:
    """Attacks grouped by their budget ``(norm, eps)``."""
    groups: dict[tuple[str, float], list[AttackSpec]] = defaultdict(list)
    for spec in specs:
        groups[(spec.norm, spec.eps)].append(spec)
    return groups


def worst_case(masks: Sequence[torch.Tensor], upto: int) -> torch.Tensor:
    """Per image, survived every attack (on the first ``upto`` images)."""
    robust = torch.ones(upto, dtype=torch.bool)
    for mask in masks:
        robust &= mask[:upto]
    return robust


class Classification(Task):
    """Logits ``N x classes``; cross-entropy; top-1 accuracy; attacks on correctly classified
    images, robust accuracy per image; mCE on accuracy."""

    name = "classification"
    output = "(N, num_classes) logits"
    objective = ClassificationObjective()

    def evaluator(self, class_names: Sequence[str]) -> Evaluator:
        return ClassificationEvaluator(class_names)

    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"the model returns {got} for a {tuple(x.shape)} batch; classification needs "
                f"{self.output} with num_classes={num_classes} (segmentation models: task: segmentation)"
            )

    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        return ev.corruptions.per_corruption, ev.clean_accuracy


TASKS.register(Classification.name)(Classification())
