"""The task interface and its registry.

A task is what a model predicts. It is split in two:

* the **objective** (:class:`Objective`): the loss, TRADES' divergence, when an attack has
  fooled an image, which images an attack is run on, and the training loop's accuracy: what
  training and attacks need;
* the **evaluator** (:class:`Evaluator`): one per runner during a validation pass, it
  accumulates the clean, attacked and corrupted scores and parity with the PyTorch model, and
  fills the task's report fields.

Stages, attacks and the one validation engine (:mod:`toolchain.robustness.suite`) ask the task
and never branch on its name. A model carries its task in its spec (:func:`task_of`), a dataset
in its bundle, a recipe in its ``task`` key, an evaluation in its ``task`` field. Outputs are
what a model returns (one tensor, or a tuple of tensors: a detector's raw heads), labels
whatever the dataset gives per batch (a tensor, or a list with one entry per image); only the
task looks inside them. Tasks import nothing of the suites or attacks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.registry import Registry

if TYPE_CHECKING:  # light modules, imported for annotations only
    from toolchain.recipe import ValidateConfig
    from toolchain.report.schema import Evaluation

#: The task of a model, dataset, recipe or evaluation that does not name one.
DEFAULT_TASK = "classification"

#: A model's output: one tensor, or a tuple of them.
Output = Any
#: A batch's labels, as the task's dataset gives them.
Labels = Any


def to_device(y: Labels, device: Any) -> Labels:
    """Labels on ``device``: a tensor, or every tensor of a list of per-image dicts."""
    if isinstance(y, torch.Tensor):
        return y.to(device)
    if isinstance(y, list | tuple):
        return [to_device(item, device) for item in y]
    if isinstance(y, dict):
        return {key: to_device(value, device) for key, value in y.items()}
    return y


def take_labels(y: Labels, index: torch.Tensor) -> Labels:
    """The labels of the images at ``index``: a tensor's rows, or a list's entries (per-image
    dicts: boxes)."""
    if isinstance(y, torch.Tensor):
        return y[index.to(y.device)]
    return [y[i] for i in index.tolist()]


def finite_images(out: Output) -> torch.Tensor:
    """Per image, whether every value the model returned for it is finite (NaN or Inf make an
    image count as wrong everywhere)."""
    tensors = out if isinstance(out, tuple | list) else (out,)
    finite: torch.Tensor | None = None
    for t in tensors:
        ok = torch.isfinite(t.detach()).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t.detach())
        finite = ok if finite is None else finite & ok
    assert finite is not None, "a model output with no tensor"
    return finite


class Objective(ABC):
    """What training and attacks need to know about a task's outputs and labels."""

    #: An attack's result per image is its highest-loss point rather than its first fooling
    #: one (per-pixel tasks: the score keeps falling after the image counts as fooled).
    keep_highest_loss: ClassVar[bool] = False

    @abstractmethod
    def loss(self, out: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """The training (and attack) loss.

        Args:
            out: the model's output; y: the labels the dataset gives.
            reduction: ``"mean"`` (over the batch), ``"sum"`` (of per-image losses) or
                ``"none"`` (one loss per image).
        """

    @abstractmethod
    def divergence(self, out: Output, reference: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """TRADES' robust term KL(p(reference) || p(out)) (Zhang et al. 2019).

        Args:
            out: the model's output on the perturbed input.
            reference: its output on the clean input (the caller detaches it or not).
            y: the labels (which predictions count: segmentation's unlabelled pixels do not).
            reduction: ``"mean"`` (the training loss' scale) or ``"sum"`` (the attack's).
        """

    @abstractmethod
    def fooled(self, out: Output, y: Labels) -> torch.Tensor:
        """Per image, whether an attack has succeeded (PGD keeps the first restart that does)."""

    @abstractmethod
    def attackable(self, out: Output, y: Labels) -> torch.Tensor:
        """Per image, whether an attack is run on it, given the model's clean output."""

    @abstractmethod
    def hits(self, out: Output, y: Labels) -> tuple[int, int]:
        """``(correct, counted)`` predictions in a batch: the training loop's accuracy."""

    def margin(self, out: Output, y: Labels) -> torch.Tensor:
        """Per image, how far the prediction is from being fooled (positive while it holds, 0 or
        below once fooled): what a black-box attack that sees only outputs (Square) lowers.

        Raises:
            UserError: the task defines no such margin (no black-box attack runs for it).
        """
        raise UserError(f"{type(self).__name__} defines no margin for black-box attacks")


@dataclass(frozen=True)
class AttackSpec:
    """One attack as the validation engine runs it: its key, report name, budget and mode.

    Attributes:
        key: unique within a pass (``attack<i>.<j>:<name>``).
        mode: the attack's own mode, ``"white-box"`` or ``"black-box"``.
        steps: iterations (white-box); ensemble: the ensemble it was expanded from.
        samples: cap on the images it sees (the first ``samples`` of the stream), or None.
    """

    key: str
    name: str
    norm: str
    eps: float
    mode: str
    steps: int
    ensemble: str | None = None
    samples: int | None = None

    def mode_on(self, is_reference: bool) -> str:
        """The report's mode on a runner: black-box, or white-box on PyTorch and transfer on
        an engine (the examples were crafted on PyTorch)."""
        if self.mode == "black-box":
            return "black-box"
        return "white-box" if is_reference else "transfer"


class Evaluator(ABC):
    """One runner's scores during a validation pass, batch by batch, and its report row.

    The engine calls, per batch: :meth:`clean` (then :meth:`compare` with the PyTorch model's
    clean output when there is one), :meth:`attacked` for each attack on the first images of the
    batch, :meth:`corrupted` for each corruption and severity. Only counters and small per-image
    records are kept, so memory does not grow with the images.

    Attributes:
        class_names: one name per class, in output order.
        nonfinite: images for which the runner returned a NaN or Inf (clean, attacked or
            corrupted), counted by :meth:`observe`.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.nonfinite = 0

    def observe(self, out: Output) -> None:
        """Count the images of a runner output with a NaN or Inf."""
        self.nonfinite += int((~finite_images(out)).sum())

    @abstractmethod
    def clean(self, out: Output, y: Labels) -> None:
        """The runner's output on a clean batch (the batch later calls refer to)."""

    @abstractmethod
    def compare(self, out: Output, reference: Output) -> None:
        """Parity of the runner's clean output with the PyTorch model's on the same batch."""

    @abstractmethod
    def attacked(
        self, spec: AttackSpec, out: Output, y: Labels, crafted_on: torch.Tensor | None, queries: int
    ) -> None:
        """The runner's output on the attacked first ``len(y)`` images of the batch.

        Args:
            spec: the attack.
            out, y: outputs and labels of the attacked images.
            crafted_on: for examples crafted on the PyTorch model, per image whether the attack
                ran on it there (an image it did not attack is never robust on an engine);
                None for an attack run against this runner itself.
            queries: the runner queries the attack made (black-box), else 0.
        """

    @abstractmethod
    def corrupted(self, key: str, out: Output, y: Labels) -> None:
        """The runner's output under corruption ``key`` (``"<name>:<severity>"``)."""

    def survived(self, key: str) -> torch.Tensor | None:
        """Per attacked image, whether it survived attack ``key`` (None for tasks without a
        per-image verdict); the engine compares attacks with it (gradient-masking flags)."""
        return None

    @abstractmethod
    def evaluation(
        self,
        common: dict[str, Any],
        specs: Sequence[AttackSpec],
        cfg: ValidateConfig,
        *,
        is_reference: bool,
        has_reference: bool,
    ) -> Evaluation:
        """The runner's report row.

        Args:
            common: the fields every task's row has (model, runtime, precision, device, ...).
            specs: the attacks that ran.
            cfg: the validate section (corruption names and severities).
            is_reference: the runner is the PyTorch model itself.
            has_reference: parity was measured against a PyTorch model.
        """


class Task(ABC):
    """What a model predicts.

    Attributes:
        name: the registry name (the recipe's ``task``).
        output: a short description of the output's shape, for error messages.
        objective: the loss and attack rules (:class:`Objective`).
        spatial_labels: labels are located in the image (pixels, boxes), so geometric
            corruptions must move them with the image.
        refused_corruptions: corruptions the task cannot score (name -> why), refused before
            a run.
    """

    name: ClassVar[str]
    output: ClassVar[str]
    objective: Objective
    spatial_labels: ClassVar[bool] = False
    #: Corruptions the task cannot score, with why (its labels cannot follow them).
    refused_corruptions: ClassVar[dict[str, str]] = {}
    #: The task post-processes a model's outputs on the host after every runtime (detection's
    #: NMS), which latency benchmarks time beside the network.
    post_processes: ClassVar[bool] = False
    #: The task can put its post-processing in an exported graph (:meth:`write_end_to_end`).
    post_processes_in_graph: ClassVar[bool] = False

    # The objective's methods on the task itself, for the training loop and attacks.
    def loss(self, out: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        return self.objective.loss(out, y, reduction)

    def divergence(self, out: Output, reference: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        return self.objective.divergence(out, reference, y, reduction)

    def fooled(self, out: Output, y: Labels) -> torch.Tensor:
        return self.objective.fooled(out, y)

    def hits(self, out: Output, y: Labels) -> tuple[int, int]:
        return self.objective.hits(out, y)

    def model_output(self, output: Any) -> Any:
        """What the task reads of a network's output: by default its main logits.

        Networks with auxiliary heads (torchvision's GoogLeNet and Inception v3) return
        ``(logits, aux_logits, ...)`` in train mode: training, attacks and scoring use the main
        logits only, so the auxiliary heads get no gradient and play no part in the result.

        Raises:
            UserError: the output holds no tensor.
        """
        if isinstance(output, torch.Tensor):
            return output
        logits = getattr(output, "logits", None)  # torchvision's GoogLeNetOutputs / InceptionOutputs
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise UserError(
            f"the model returned a {type(output).__name__}; a {self.name} model must return logits "
            "(or a tuple whose first element is the logits)"
        )

    def post_process(self, out: Output) -> Any:
        """What a deployment computes from the outputs on the host (identity by default)."""
        return out

    def output_names(self, count: int) -> list[str] | None:
        """Names of a model's ``count`` outputs in exported files (None: the exporter's own)."""
        return None

    def write_end_to_end(self, source: Path, target: Path) -> Callable[[Output, Any], tuple[int, int]] | None:
        """Write ``target``: the exported ``source`` with the task's post-processing in the graph
        (``export.end_to_end``). Returns how the stage counts agreeing predictions of the raw
        file's outputs (post-processed on the host) and the new file's on one batch
        (``(agreeing, compared)``). None: the task has nothing to put in a graph, and writes
        nothing (preflight refuses the setting)."""
        return None

    @property
    def parity_agreement(self) -> Callable[[Output, Output], tuple[int, int]] | None:
        """How the export parity check counts agreeing predictions of two runtimes on one batch
        (``(agreeing, compared)``); None: the arg-max class per image or pixel decides."""
        return None

    @property
    def precision_agreement(self) -> Callable[[Output, Output], tuple[int, int]] | None:
        """How an INT8 file's answers are compared with its FP32 file's (``(agreeing,
        compared)`` per batch); None: the arg-max class per image or pixel."""
        return None

    @abstractmethod
    def evaluator(self, class_names: Sequence[str]) -> Evaluator:
        """A fresh evaluator for one runner."""

    @abstractmethod
    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        """Refuse a model whose output on ``x`` is not this task's.

        Raises:
            UserError: the shape is wrong; the message says which shape is needed.
        """

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
