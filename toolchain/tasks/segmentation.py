"""``segmentation``: one label per pixel, ``IGNORE_INDEX`` (255) where no class applies.

Every image is attacked (there is no "correctly classified image" to restrict to; a pixel
already wrong stays counted as wrong), attacks score on the mean per-pixel cross-entropy over
the labelled pixels, and what is kept per runner is a confusion matrix per condition (clean,
each attack with the same images clean, each corruption and severity), so memory does not grow
with the images. Parity counts agreeing pixels, and a pixel with a NaN or Inf logit counts as
misclassified. A pixel where an engine picks another class at a near-tie that its logit
difference explains (:func:`exporters.parity.tie_flips`; bilinear upsampling makes the logits
of two classes cross exactly at every boundary) counts as agreeing and is counted in
``parity.ties``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from exporters.parity import tie_flips
from toolchain.errors import UserError
from toolchain.report.schema import AttackRow, Corruptions, Evaluation, Parity, RobustMiou
from toolchain.tasks.base import TASKS, AttackSpec, Evaluator, Labels, Objective, Output, Task
from toolchain.tasks.seg_metrics import IGNORE_INDEX, class_iou, confusion, mean_iou, pixel_accuracy

if TYPE_CHECKING:
    from toolchain.recipe import ValidateConfig

__all__ = ["IGNORE_INDEX", "Segmentation", "SegmentationEvaluator", "SegmentationObjective"]


class SegmentationObjective(Objective):
    """Per-pixel cross-entropy over labelled pixels; an image is fooled once fewer than half of
    its labelled pixels are right; every image is attacked, to its highest-loss point."""

    keep_highest_loss = True

    def loss(self, out: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """Per-pixel cross-entropy; ``mean`` over every labelled pixel of the batch, ``none``
        (and ``sum``) per image: the mean over its labelled pixels (0 for an image with none)."""
        if reduction == "mean":
            return F.cross_entropy(out, y, ignore_index=IGNORE_INDEX)
        per_pixel = F.cross_entropy(out, y, ignore_index=IGNORE_INDEX, reduction="none")
        labelled = (y != IGNORE_INDEX).flatten(1).sum(1).clamp_min(1)
        per_image = per_pixel.flatten(1).sum(1) / labelled
        return per_image.sum() if reduction == "sum" else per_image

    def divergence(self, out: Output, reference: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """Our per-pixel reading of TRADES' KL (Zhang et al. 2019, defined there per image): at
        each labelled pixel, KL between the clean and the perturbed class distributions (summed
        over classes); ``mean`` over the batch's labelled pixels, as the per-pixel
        cross-entropy, or ``sum`` (the inner maximisation's objective). Unlabelled pixels
        (``IGNORE_INDEX``) count in neither, as in the cross-entropy. Computed from log
        probabilities on both sides, so it is exactly 0 where the two outputs are equal."""
        per_pixel = F.kl_div(
            F.log_softmax(out, dim=1), F.log_softmax(reference, dim=1), reduction="none", log_target=True
        ).sum(1)
        labelled = y != IGNORE_INDEX
        total = (per_pixel * labelled).sum()
        return total if reduction == "sum" else total / labelled.sum().clamp_min(1)

    def fooled(self, out: Output, y: Labels) -> torch.Tensor:
        """An image counts as fooled once fewer than half of its labelled pixels are right."""
        valid = y != IGNORE_INDEX
        right = ((out.argmax(1) == y) & valid).flatten(1).sum(1)
        return 2 * right < valid.flatten(1).sum(1)

    def attackable(self, out: Output, y: Labels) -> torch.Tensor:
        return torch.ones(len(y), dtype=torch.bool, device=out.device)

    def hits(self, out: Output, y: Labels) -> tuple[int, int]:
        valid = y != IGNORE_INDEX
        return int(((out.argmax(1) == y) & valid).sum()), int(valid.sum())


class SegmentationEvaluator(Evaluator):
    """Confusion matrices per condition (``"clean"``, an attack's key and ``"<key>:clean"``,
    ``"<corruption>:<severity>"``) and per-pixel parity counters."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names)
        self.classes = len(self.class_names)
        self.tables: dict[str, torch.Tensor] = {}
        self.attack_images: dict[str, int] = defaultdict(int)
        self.images = 0
        self._batch_clean: torch.Tensor | None = None
        self._max_abs_diff = 0.0
        self._agree = self._compared = self._parity_nonfinite = self._ties = 0

    def _predict(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Arg-max per pixel; a pixel with a NaN or Inf logit is made wrong on purpose."""
        finite = torch.isfinite(out).all(dim=1)
        wrong = (y.clamp(max=self.classes - 1) + 1) % self.classes
        return torch.where(finite, out.argmax(1), wrong)

    def _add(self, key: str, out: torch.Tensor, y: torch.Tensor) -> None:
        counts = confusion(self._predict(out, y), y, self.classes)
        self.tables[key] = self.tables[key] + counts if key in self.tables else counts

    def clean(self, out: Output, y: Labels) -> None:
        self.observe(out)
        self.images += len(y)
        self._batch_clean = out
        self._add("clean", out, y)

    def compare(self, out: Output, reference: Output) -> None:
        finite = torch.isfinite(out).all(dim=1) & torch.isfinite(reference).all(dim=1)
        self._parity_nonfinite += int((~finite).flatten(1).any(1).sum())
        if finite.any():
            diff = (out - reference).abs().amax(1)[finite]
            self._max_abs_diff = max(self._max_abs_diff, float(diff.max()))
        tied = tie_flips(reference, out) & finite
        self._ties += int(tied.sum())
        self._agree += int((((out.argmax(1) == reference.argmax(1)) | tied) & finite).sum())
        self._compared += finite.numel()

    def attacked(
        self, spec: AttackSpec, out: Output, y: Labels, crafted_on: torch.Tensor | None, queries: int
    ) -> None:
        assert self._batch_clean is not None, "clean() comes first in every batch"
        self.observe(out)
        n = len(y)
        self._add(spec.key, out, y)
        # The same images clean, so an attack's mIoU has its own baseline.
        self._add(f"{spec.key}:clean", self._batch_clean[:n], y)
        self.attack_images[spec.key] += n

    def corrupted(self, key: str, out: Output, y: Labels) -> None:
        self.observe(out)
        self._add(key, out, y)

    def evaluation(
        self,
        common: dict[str, Any],
        specs: Sequence[AttackSpec],
        cfg: ValidateConfig,
        *,
        is_reference: bool,
        has_reference: bool,
    ) -> Evaluation:
        parity = None
        if has_reference:
            parity = Parity(
                reference="torch",
                max_abs_diff=None if self._parity_nonfinite else self._max_abs_diff,
                top1_agreement=self._agree / max(self._compared, 1),
                compared=self._compared,
                nonfinite=self._parity_nonfinite,
                ties=self._ties,
            )
        rows = self._attack_rows(specs, is_reference)
        clean = self.tables.get("clean", torch.zeros(self.classes, self.classes, dtype=torch.int64))
        return Evaluation(
            **common,
            samples=self.images,
            task=Segmentation.name,
            clean_accuracy=pixel_accuracy(clean),
            pixel_accuracy=pixel_accuracy(clean),
            miou=mean_iou(clean),
            per_class_iou=dict(zip(self.class_names, class_iou(clean))),
            corruptions=self._corruptions(cfg),
            attacks=rows,
            robust_miou=_robust_miou(rows),
            parity=parity,
            nonfinite_logits=self.nonfinite,
        )

    def _attack_rows(self, specs: Sequence[AttackSpec], is_reference: bool) -> list[AttackRow]:
        return [
            AttackRow(
                name=s.name,
                mode=s.mode_on(is_reference),  # type: ignore[arg-type]
                norm=s.norm,
                eps=s.eps,
                steps=s.steps,
                samples=self.attack_images[s.key],
                accuracy=pixel_accuracy(self.tables[s.key]),
                miou=mean_iou(self.tables[s.key]),
                clean_miou=mean_iou(self.tables[f"{s.key}:clean"]),
            )
            for s in specs
            if s.key in self.tables
        ]

    def _corruptions(self, cfg: ValidateConfig) -> Corruptions:
        names, severities = list(cfg.corruptions.names), list(cfg.corruptions.severities)
        if not names:
            return Corruptions()

        def per(score: Any) -> dict[str, dict[str, float]]:
            return {c: {str(s): score(self.tables[f"{c}:{s}"]) for s in severities} for c in names}

        accuracy, miou = per(pixel_accuracy), per(mean_iou)
        return Corruptions(
            per_corruption=accuracy,
            mean_accuracy=_mean(accuracy),
            per_corruption_miou=miou,
            mean_miou=_mean(miou),
        )


def _mean(per: dict[str, dict[str, float]]) -> float | None:
    values = [v for by_sev in per.values() for v in by_sev.values()]
    return sum(values) / len(values) if values else None


def _robust_miou(rows: list[AttackRow]) -> list[RobustMiou]:
    """Per budget: the lowest mIoU among the attacks run at it (the fewest images any saw)."""
    budgets: dict[tuple[str, float], list[AttackRow]] = defaultdict(list)
    for row in rows:
        budgets[(row.norm, row.eps)].append(row)
    return [
        RobustMiou(
            norm=norm,
            eps=eps,
            miou=min(r.miou or 0.0 for r in group),
            samples=min(r.samples for r in group),
            attacks=[r.name for r in group],
        )
        for (norm, eps), group in budgets.items()
    ]


class Segmentation(Task):
    """Logits ``N x classes x H x W`` at the input resolution; per-pixel cross-entropy over the
    labelled pixels; pixel accuracy; mIoU, per-class IoU, mIoU per corruption and severity;
    mCE on mIoU."""

    name = "segmentation"
    output = "(N, num_classes, H, W) logits at the input's H x W"
    objective = SegmentationObjective()
    spatial_labels = True

    def evaluator(self, class_names: Sequence[str]) -> Evaluator:
        return SegmentationEvaluator(class_names)

    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        want = (x.shape[0], num_classes, *x.shape[-2:])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"the model returns {got} for a {tuple(x.shape)} batch; task segmentation needs "
                f"{self.output}, here {want}: use a segmentation model (e.g. model.arch: segnet)"
            )

    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        return ev.corruptions.per_corruption_miou, ev.miou if ev.miou is not None else 0.0


TASKS.register(Segmentation.name)(Segmentation())
