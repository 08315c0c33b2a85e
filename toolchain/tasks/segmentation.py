"""``segmentation``: one label per pixel, ``IGNORE_INDEX`` (255) where no class applies."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.errors import UserError
from toolchain.tasks.base import TASKS, Task

if TYPE_CHECKING:
    from exporters.base import Runner
    from toolchain.recipe import Recipe, ValidateConfig
    from toolchain.report.schema import Evaluation

#: Label of pixels that belong to no class (Cityscapes' convention): no loss, no metric.
IGNORE_INDEX = 255


class Segmentation(Task):
    """Logits ``N x classes x H x W`` at the input resolution; per-pixel cross-entropy over the
    labelled pixels; pixel accuracy; the suite of :mod:`toolchain.robustness.seg_suite` (mIoU,
    per-class IoU, mIoU per corruption and severity, PGD, FGSM, APGD-CE and SegPGD); mCE on mIoU."""

    name = "segmentation"
    output = "(N, num_classes, H, W) logits at the input's H x W"

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Per-pixel cross-entropy; ``mean`` over every labelled pixel of the batch, ``none``
        (and ``sum``) per image: the mean over its labelled pixels (0 for an image with none)."""
        if reduction == "mean":
            return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        per_pixel = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
        labelled = (y != IGNORE_INDEX).flatten(1).sum(1).clamp_min(1)
        per_image = per_pixel.flatten(1).sum(1) / labelled
        return per_image.sum() if reduction == "sum" else per_image

    def divergence(
        self, logits: torch.Tensor, reference: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Our per-pixel reading of TRADES' KL (Zhang et al. 2019, defined there per image): at
        each labelled pixel, KL between the clean and the perturbed class distributions (summed
        over classes); ``mean`` over the batch's labelled pixels, as the per-pixel
        cross-entropy, or ``sum`` (the inner maximisation's objective). Unlabelled pixels
        (``IGNORE_INDEX``) count in neither, as in the cross-entropy. Computed from log
        probabilities on both sides, so it is exactly 0 where the two outputs are equal."""
        per_pixel = F.kl_div(
            F.log_softmax(logits, dim=1), F.log_softmax(reference, dim=1), reduction="none", log_target=True
        ).sum(1)
        labelled = y != IGNORE_INDEX
        total = (per_pixel * labelled).sum()
        return total if reduction == "sum" else total / labelled.sum().clamp_min(1)

    def fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """An image counts as fooled once fewer than half of its labelled pixels are right."""
        valid = y != IGNORE_INDEX
        right = ((logits.argmax(1) == y) & valid).flatten(1).sum(1)
        return 2 * right < valid.flatten(1).sum(1)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        valid = y != IGNORE_INDEX
        return int(((logits.argmax(1) == y) & valid).sum()), int(valid.sum())

    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        want = (x.shape[0], num_classes, *x.shape[-2:])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"the model returns {got} for a {tuple(x.shape)} batch; task segmentation needs "
                f"{self.output}, here {want}: use a segmentation model (e.g. model.arch: segnet)"
            )

    def check_recipe(self, recipe: Recipe) -> None:
        from toolchain.robustness.seg_suite import build_seg_attacks

        build_seg_attacks(list(recipe.validate.attacks))  # pgd, segpgd, fgsm, apgd are defined per pixel

    def evaluate(
        self,
        model: nn.Module | None,
        runners: Mapping[str, Runner],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        cfg: ValidateConfig,
        *,
        model_name: str,
        class_names: Sequence[str],
        progress: bool = True,
    ) -> list[Evaluation]:
        from toolchain.robustness.seg_suite import evaluate_segmentation

        return evaluate_segmentation(
            model, runners, batches, cfg, model_name=model_name, class_names=class_names, progress=progress
        )

    def parity_craft(
        self, model: nn.Module, cfg: ValidateConfig
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The first attack of ``cfg.attacks`` as the suite crafts it (every image, per pixel)."""
        from toolchain.robustness.seg_suite import build_seg_attacks

        if not cfg.attacks:
            return None
        first = cfg.attacks[0]
        (attack,) = build_seg_attacks([first.model_copy(update={"steps": max(first.steps or 10, 1)})])
        return lambda x, y: attack.craft(model.eval(), x, y)

    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        return ev.corruptions.per_corruption_miou, ev.miou if ev.miou is not None else 0.0


TASKS.register(Segmentation.name)(Segmentation())
