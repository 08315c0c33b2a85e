"""The task interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from toolchain.registry import Registry

if TYPE_CHECKING:  # the heavy modules are only needed by callers that evaluate
    from exporters.base import Runner
    from toolchain.recipe import Recipe, ValidateConfig
    from toolchain.report.schema import Evaluation

#: The task of a model, dataset, recipe or evaluation that does not name one.
DEFAULT_TASK = "classification"


class Task(ABC):
    """What a model predicts: its loss, metrics, attack objective and validation suite.

    Attributes:
        name: the registry name (the recipe's ``task``).
        output: a short description of the logits' shape, for error messages.
    """

    name: ClassVar[str]
    output: ClassVar[str]

    @abstractmethod
    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training (and attack) loss.

        Args:
            logits: the model's output; y: the labels the dataset gives.
            reduction: ``"mean"`` (over the batch), ``"sum"`` (of per-image losses) or
                ``"none"`` (one loss per image).
        """

    @abstractmethod
    def divergence(
        self, logits: torch.Tensor, reference: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """TRADES' robust term KL(p(reference) || p(logits)) (Zhang et al. 2019).

        Args:
            logits: the model's output on the perturbed input.
            reference: its output on the clean input (the caller detaches it or not).
            y: the labels (which predictions count: segmentation's unlabelled pixels do not).
            reduction: ``"mean"`` (the training loss' scale) or ``"sum"`` (the attack's).
        """

    @abstractmethod
    def fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per image, whether an attack has succeeded (PGD keeps the first restart that does)."""

    @abstractmethod
    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """``(correct, counted)`` predictions in a batch: the training loop's accuracy."""

    @abstractmethod
    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        """Refuse a model whose output on ``x`` is not this task's logits.

        Raises:
            UserError: the shape is wrong; the message says which shape is needed.
        """

    def check_recipe(self, recipe: Recipe) -> None:  # noqa: B027  # optional override
        """Refuse recipe settings this task cannot run (before anything is written).

        Raises:
            UserError: names the setting and what to use instead.
        """

    @abstractmethod
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
        """Run the validate section on one model and each of its runners (one row each)."""

    @abstractmethod
    def parity_craft(
        self, model: nn.Module, cfg: ValidateConfig
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """``(x, y) -> x_adv``: the adversarial inputs INT8 files are compared with their FP32
        file on (crafted on ``model``, from the first white-box attack of ``cfg.attacks`` with
        its own steps, 10 when unset); ``None`` when ``cfg`` lists none."""

    @abstractmethod
    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        """The per-corruption, per-severity score and the clean score mCE is computed on."""


TASKS: Registry[Task] = Registry("task")


def task_named(name: str | None) -> Task:
    """The registered task ``name`` (the default task for ``None``).

    Raises:
        UnknownNameError: not a registered task; the message lists the known ones.
    """
    return TASKS.get(name or DEFAULT_TASK)


def task_of(model: nn.Module) -> Task:
    """The task a model was built for: its spec's ``task`` (models without one classify)."""
    spec = getattr(model, "spec", None)
    name = spec.get("task") if isinstance(spec, dict) else None
    return task_named(name)
