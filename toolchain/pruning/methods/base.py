"""The pruning-method interface: a registry of methods, the job they get, what they return.

A method turns a dense model, training data, a budget and training settings into a physically
pruned model plus its torch-pruning history. The pipeline calls :func:`prune_model` and never
branches on a method's name. A new method is one file with one registered class, plus its
import in :mod:`toolchain.pruning.methods`: the class names its settings type (a
:class:`~toolchain.recipe_prune.MethodSection` defined beside it), which the recipe accepts as
``prune.<name>``, and which of the iterative method's ``prune`` keys it reads (``prune_keys``).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import ValidationError
from pydantic_core import InitErrorDetails
from torch import Tensor, nn
from torch.utils.data import DataLoader

from toolchain.errors import RecipeError
from toolchain.pruning.budget import Budget, check_reachable
from toolchain.pruning.graph import HistoryEntry, count_macs_params
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.trial import check_removal
from toolchain.recipe import describe_error
from toolchain.recipe_prune import ITERATIVE_KEYS, PGD3, PruneConfig
from toolchain.recipe_train import AttackConfig, Section
from toolchain.registry import Registry
from toolchain.training.checkpoint import TrainCheckpoint

logger = logging.getLogger(__name__)


@dataclass
class PruneJob:
    """Everything a method is given besides the model and its own settings.

    Attributes:
        example_inputs: one batch (``1xCxHxW``) to trace and count MACs on.
        budget: the target and its constraints.
        ignored_layers: layers whose output channels stay (the classifier head at least).
        loader: ``seed_offset -> DataLoader`` of training batches (a fresh shuffle per call).
        attack: ``prune.attack``, the perturbation criteria score on.
        seed: the run's seed; methods derive their own seeds from it.
        progress: show progress bars.
        device: where training runs.
        checkpoint: where in-the-loop training saves its state every epoch and resumes from.
        teacher: the dense model, untouched, for in-the-loop training with a distillation loss
            (``ard``, ``rslad``); training reads a frozen copy of it.
    """

    example_inputs: Tensor
    budget: Budget
    ignored_layers: list[nn.Module]
    loader: Callable[[int], DataLoader]
    attack: AttackConfig = PGD3
    seed: int = 0
    progress: bool = True
    device: str = "cpu"
    checkpoint: TrainCheckpoint | None = None
    teacher: nn.Module | None = None


@dataclass
class PruneOutcome:
    """What a method returns.

    Attributes:
        model: the physically pruned model (the one passed in, changed in place, or a new one).
        history: JSON torch-pruning history; replaying it on the dense model rebuilds the shapes.
        steps: one record per pruning step, mask update or epoch, as the method defines.
        info: method-specific results worth keeping (budgets used, rewiring counts, gates);
            small, it goes into the report.
        trace: bulky per-batch records; kept in the prune stage's record only.
        structure: low-rank factorisation records applied after the history (``lowrank``).
    """

    model: nn.Module
    history: list[HistoryEntry]
    steps: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    structure: list[dict[str, Any]] = field(default_factory=list)


class PruningMethod(ABC):
    """One registered method. Subclasses set ``name``, ``settings`` and implement :meth:`run`.

    Attributes:
        name: the registry name (``prune.method``).
        settings: the type of the method's recipe sub-section (``prune.<name>``), or None.
        trains: whether the method trains inside pruning (its epochs count as training).
        uses_masks: whether it trains through channel masks (every group must be maskable).
        prune_keys: the keys of ``prune`` itself it reads besides the budget (``criterion``,
            ``steps``, ``importance_batches``, ``finetune_between``, ``attack``); setting
            another of them for this method is an error.
        description: one line for listings.
    """

    name: ClassVar[str]
    settings: ClassVar[type[Section] | None] = None
    trains: ClassVar[bool] = False
    uses_masks: ClassVar[bool] = False
    prune_keys: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    @property
    def own(self) -> Any:
        """This method's sub-section of the recipe (defaults filled in)."""
        return method_settings(self.cfg)

    @property
    def prunes_channels(self) -> bool:
        """Whether the method removes channels (the pre-flight check then prunes a copy)."""
        return True

    @abstractmethod
    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        """Prune ``model`` to ``job.budget``; see :class:`PruneOutcome`."""

    def check(
        self, model: nn.Module, example_inputs: Tensor, ignored: list[nn.Module], budget: Budget
    ) -> None:
        """Refuse, before any training, a model or budget this method cannot handle.

        Raises:
            BudgetError: the budget is out of reach under ``round_to``/``max_layer_pruning``.
            UserError: a group cannot be masked (methods that train through masks), or the model
                no longer runs once channels are removed (it names the layers).
        """
        masks = ChannelMasks(
            model, example_inputs, ignored, max_layer_pruning=budget.max_layer_pruning, strict=self.uses_masks
        )
        check_reachable(masks, budget)
        check_removal(model, example_inputs, ignored, max_layer_pruning=budget.max_layer_pruning)


METHODS: Registry[type[PruningMethod]] = Registry("pruning method")


def method_settings(cfg: PruneConfig) -> Section | None:
    """The selected method's settings: ``prune.<method>`` validated by the type the method
    declares (its defaults where the recipe leaves keys out), or None for a method without
    settings.

    Raises:
        UnknownNameError: ``prune.method`` is not a registered method.
        RecipeError: the section does not validate (the message names the key).
    """
    settings = METHODS.get(cfg.method).settings
    if settings is None:
        return None
    raw = cfg.sections.get(cfg.method, {})
    try:
        return settings.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"recipe: {describe_error(_under(exc, 'prune', cfg.method))}") from None


def check_sections(cfg: PruneConfig) -> None:
    """Refuse, before a run, a ``prune`` section its method does not read.

    Raises:
        UnknownNameError: ``prune.method`` is not a registered method.
        RecipeError: a key that is neither a setting of ``prune`` nor the section of a method
            with settings; the section of a method that is not selected; a key of ``prune``
            that configures the iterative method while another is selected; or a section that
            does not validate.
    """
    method = METHODS.get(cfg.method)
    for name in cfg.sections:
        if name not in METHODS or METHODS.get(name).settings is None:
            raise RecipeError(
                f"recipe: unknown key 'prune.{name}'; check the spelling against the recipe reference"
            )
        if name != cfg.method:
            raise RecipeError(
                f"recipe: prune.{name} is set but prune.method is {cfg.method!r}; "
                f"set prune.method: {name} or remove the prune.{name} section"
            )
    stray = sorted((ITERATIVE_KEYS - method.prune_keys) & cfg.model_fields_set)
    if stray:
        raise RecipeError(
            f"recipe: prune.{stray[0]} configures the iterative method, not {cfg.method!r}; remove it"
        )
    method_settings(cfg)


def _under(exc: ValidationError, *where: str) -> ValidationError:
    """``exc`` with its error locations under ``where`` (a nested section's path)."""
    return ValidationError.from_exception_data(
        exc.title,
        [
            InitErrorDetails(type=e["type"], loc=(*where, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
            for e in exc.errors()
        ],
    )


@dataclass
class PruneResult:
    """What pruning did, as the pipeline records it.

    Attributes:
        model: the pruned model.
        history: torch-pruning history (JSON types) for ``save_pruned``.
        method: the method's name.
        dense_macs, dense_params, macs, params: sizes before and after (torch-pruning's count).
        macs_reduction, params_reduction: ``dense / pruned``.
        target_met: the budget's reduction is met within its tolerance.
        steps, info, trace, structure: the method's records (see :class:`PruneOutcome`).
        seconds: wall time.
    """

    model: nn.Module
    history: list[HistoryEntry]
    method: str
    dense_macs: int
    dense_params: int
    macs: int
    params: int
    macs_reduction: float
    params_reduction: float
    target_met: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    structure: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def prune_model(model: nn.Module, job: PruneJob, cfg: PruneConfig) -> PruneResult:
    """Prune ``model`` with the method ``cfg.method`` names (the pipeline's one verb).

    Raises:
        UnknownNameError: unknown method.
        BudgetError: the budget cannot be reached under ``round_to``/``max_layer_pruning``.
        UserError: a model whose groups cannot be masked, bad settings.
    """
    return run_method(METHODS.get(cfg.method)(cfg), model, job)


def run_method(method: PruningMethod, model: nn.Module, job: PruneJob) -> PruneResult:
    """Run one method instance and measure what it achieved (see :func:`prune_model`)."""
    started = time.perf_counter()
    dense_macs, dense_params = count_macs_params(model, job.example_inputs)
    outcome = method.run(model, job)
    macs, params = count_macs_params(outcome.model, job.example_inputs)
    budget = job.budget
    dense = budget.pick(dense_macs, dense_params)
    achieved = budget.pick(macs, params)
    met = budget.met(dense, achieved)
    if not met:
        logger.warning(
            "%s: %s reduction %.3f misses the target %.3f by more than %.0f%%",
            method.name,
            budget.metric,
            dense / achieved,
            budget.reduction,
            budget.tolerance * 100,
        )
    return PruneResult(
        model=outcome.model,
        history=outcome.history,
        method=method.name,
        dense_macs=dense_macs,
        dense_params=dense_params,
        macs=macs,
        params=params,
        macs_reduction=dense_macs / macs,
        params_reduction=dense_params / params,
        target_met=met,
        steps=outcome.steps,
        info=outcome.info,
        trace=outcome.trace,
        structure=outcome.structure,
        seconds=time.perf_counter() - started,
    )
