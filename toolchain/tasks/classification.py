"""``classification``: one label per image (the default task)."""

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


class Classification(Task):
    """Logits ``N x classes``; cross-entropy; top-1 accuracy; the suite of
    :mod:`toolchain.robustness.suite` (attacks on correctly classified images, robust accuracy
    per image); mCE on accuracy."""

    name = "classification"
    output = "(N, num_classes) logits"

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction=reduction)

    def divergence(
        self, logits: torch.Tensor, reference: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """KL per image, summed over classes; ``mean`` over the batch (``batchmean``) or ``sum``."""
        return F.kl_div(
            F.log_softmax(logits, dim=1),
            F.softmax(reference, dim=1),
            reduction="batchmean" if reduction == "mean" else "sum",
        )

    def fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != y

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        return int((logits.argmax(1) == y).sum()), len(y)

    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"the model returns {got} for a {tuple(x.shape)} batch; classification needs "
                f"{self.output} with num_classes={num_classes} (segmentation models: task: segmentation)"
            )

    def check_recipe(self, recipe: Recipe) -> None:
        from toolchain.robustness.suite import build_suite_attacks

        # Built, not only looked up: bad options or a missing optional package fail here.
        build_suite_attacks(list(recipe.validate.attacks))

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
        from toolchain.robustness.suite import evaluate_model

        return evaluate_model(model, dict(runners), batches, cfg, model_name=model_name, progress=progress)

    def parity_craft(
        self, model: nn.Module, cfg: ValidateConfig
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """PGD (attacking correctly classified images only, as the suite) at the budget of the
        first of ``pgd``, ``fgsm``, ``apgd`` in ``cfg.attacks``, seeded by the corruption seed."""
        from toolchain.robustness.attacks import build_attack

        white = next((a for a in cfg.attacks if a.name in ("pgd", "fgsm", "apgd")), None)
        if white is None:
            return None
        # Unset steps means the attack's own default; 10 is plenty to probe INT8 against FP32.
        options: dict[str, Any] = {"eps": white.eps, "steps": max(white.steps or 10, 1), "norm": white.norm}
        if white.step_size is not None:
            options["step_size"] = white.step_size
        pgd = build_attack("pgd", seed=cfg.corruptions.seed, **options)
        return lambda x, y: pgd(model.eval(), x, y).x_adv

    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        return ev.corruptions.per_corruption, ev.clean_accuracy


TASKS.register(Classification.name)(Classification())
