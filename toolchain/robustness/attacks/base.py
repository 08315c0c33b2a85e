"""What every attack shares: the ``Attack`` template, its result, and accuracy helpers.

Attacks work in [0, 1] pixel space; normalisation lives inside the model. White-box attacks
need a differentiable ``nn.Module``; black-box attacks need only a callable that maps a batch
to outputs (a :class:`exporters.base.Runner` or a module, called under ``no_grad``). Each
attack declares the tasks it is defined for (``tasks``) and scores on its task's objective
(:class:`toolchain.tasks.Objective`): the task it was built for, else the model's own.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import nn

from exporters.outputs import Outputs, concat, map_outputs
from toolchain.errors import UserError
from toolchain.registry import Registry
from toolchain.tasks import Objective, Task, take_labels, task_named, task_of

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "Classifier",
    "eval_mode",
    "margin",
    "parse_eps",
    "predict",
    "robust_accuracy",
]

#: Anything that maps a float32 NCHW batch in [0, 1] to its outputs (logits, or a tuple of
#: tensors): a Runner or an ``nn.Module``.
Classifier = Callable[[torch.Tensor], Outputs]

_NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on one batch.

    Attributes:
        x_adv: adversarial batch, detached, same shape and device as the input, in [0, 1].
        queries: per-sample number of model queries (int64, CPU) for black-box attacks;
            ``None`` for white-box attacks, whose cost is their step count.
    """

    x_adv: torch.Tensor
    queries: torch.Tensor | None = None

    @property
    def mean_queries(self) -> float | None:
        """Mean queries per sample, or ``None`` for white-box attacks."""
        if self.queries is None or self.queries.numel() == 0:
            return None
        return float(self.queries.float().mean())


class Attack(ABC):
    """An untargeted evasion attack with a fixed budget.

    ``__call__`` validates the batch, answers ``eps == 0`` with the clean batch, and delegates
    to ``_run``. Each call re-seeds its own CPU generator from ``seed``, so attacking the same
    batch twice (e.g. a PyTorch model and an engine of it) draws the same random numbers.

    Attributes:
        name: registry name.
        mode: ``"white-box"`` (needs gradients) or ``"black-box"`` (needs outputs only).
        tasks: the tasks the attack is defined for; ``limited_because`` says why not others.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the norm ball in pixel units.
        steps: iterations (white-box); black-box attacks use ``queries`` instead.
        seed: seed of the generator re-created at every call.
        task: the task it was built for (:func:`build_attack`); None: the attacked model's.
    """

    name: ClassVar[str]
    mode: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = _NORMS
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    limited_because: ClassVar[str] = "it is defined on one label per image"
    #: The fewest classes the attack is defined for (checked before a run; see ``min_classes_why``).
    min_classes: ClassVar[int] = 0
    min_classes_why: ClassVar[str] = ""
    task: Task | None = None

    def __init__(self, *, eps: float, norm: str = "linf", steps: int = 0, seed: int = 0) -> None:
        if norm not in self.norms:
            raise UserError(f"attack {self.name!r} supports norm {' or '.join(self.norms)}, got {norm!r}")
        if not math.isfinite(eps) or eps < 0:
            raise UserError(f"attack {self.name!r}: eps must be a finite number >= 0, got {eps}")
        if steps < 0:
            raise UserError(f"attack {self.name!r}: steps must be >= 0, got {steps}")
        self.eps, self.norm, self.steps, self.seed = float(eps), norm, int(steps), int(seed)

    def for_task(self, task: str) -> Attack:
        """Score on ``task``'s objective whatever the attacked model (a runner has no task).

        Raises:
            UnknownNameError: an unknown task.
            UserError: the attack is not defined for ``task``.
        """
        if task not in self.tasks:
            raise UserError(
                f"{self.name!r} is not a {task} attack ({self.limited_because}); use "
                f"{', '.join(n for n in ATTACKS if task in ATTACKS.get(n).tasks)}"
            )
        self.task = task_named(task)
        for part in self.components():
            if part is not self:
                part.for_task(task)
        return self

    def objective(self, model: Any) -> Objective:
        """The objective this attack scores on: its task's, else the model's own task's."""
        return (self.task or task_of(model)).objective

    def __call__(self, model: Classifier, x: torch.Tensor, y: Any) -> AttackResult:
        """Attack ``model`` on the batch ``(x, y)``, on the images its task attacks (for
        classification: the images it classifies correctly; AutoAttack's rule).

        Args:
            model: an ``nn.Module`` (white-box) or any outputs callable (black-box).
            x: float32 batch ``(N, C, H, W)`` in [0, 1].
            y: the labels, one entry per image (integer labels ``(N,)`` for classification).

        Returns:
            The adversarial batch (and query counts for black-box attacks). Images not attacked
            are returned unchanged, with 0 queries.

        Raises:
            UserError: bad batch, or a white-box attack given something that is not a module.
        """
        _check_batch(x, y, self.name)
        if self.mode == "white-box" and not isinstance(model, nn.Module):
            raise UserError(
                f"attack {self.name!r} is white-box and needs the PyTorch model, got "
                f"{type(model).__name__}; replay its examples on an engine (transfer) or use 'square'"
            )
        x, y = x.detach(), (y.detach() if isinstance(y, torch.Tensor) else y)
        x_adv = x.clone()
        queries = torch.zeros(len(x), dtype=torch.long) if self.mode == "black-box" else None
        if self.eps == 0 or len(x) == 0:
            return AttackResult(x_adv, queries)
        attacked = self.objective(model).attackable(predict(model, x), y).nonzero().squeeze(1)
        if len(attacked):
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            result = self._run(model, x[attacked], take_labels(y, attacked), generator)
            x_adv[attacked] = result.x_adv
            if queries is not None and result.queries is not None:
                queries[attacked.cpu()] = result.queries
        return AttackResult(x_adv, queries)

    @abstractmethod
    def _run(self, model: Any, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        """Attack a validated, detached, non-empty batch with ``eps > 0`` that the model
        classifies correctly.

        ``model`` is an ``nn.Module`` for white-box attacks (checked by ``__call__``) and a
        :data:`Classifier` for black-box ones; subclasses annotate the one they get.
        """

    def components(self) -> list[Attack]:
        """The attacks the validation suite runs and reports for this one: itself, or an
        ensemble's parts (each scored per runtime, then combined per image)."""
        return [self]

    @classmethod
    def from_options(cls, **options: object) -> Attack:
        """Build from the recipe's common attack options (eps, norm, steps, step_size, restarts,
        queries, targets, seed): each attack takes the ones its constructor names and ignores
        the rest, since a recipe lists ``steps`` for Square too and ``step_size`` for APGD, which
        adapts its own step from 2 * eps. An option given as ``None`` keeps the attack's own
        default (PGD 20 steps, APGD 100, Square 1,000 queries).

        Raises:
            UserError: ``restarts`` above 1 for an attack that has no restarts (it would be
                silently dropped).
        """
        accepted = inspect.signature(cls.__init__).parameters
        restarts = options.get("restarts")
        if isinstance(restarts, int) and restarts > 1 and "restarts" not in accepted:
            raise UserError(
                f"attack {cls.name!r} has no restarts (restarts={restarts}): remove restarts from its "
                f"entry, or use pgd, apgd, apgd-t or autoattack-lite"
            )
        chosen = {k: v for k, v in options.items() if k in accepted and v is not None}
        return cls(**chosen)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.5g}, norm={self.norm}, steps={self.steps})"


#: name → attack class; filled by the ``@ATTACKS.register`` decorators of the attack modules.
ATTACKS: Registry[type[Attack]] = Registry("attack")


def _check_batch(x: torch.Tensor, y: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"attack {name!r}: x must be a float NCHW tensor, got {getattr(x, 'shape', x)!r}")
    labels_ok = (isinstance(y, torch.Tensor) and y.dim() >= 1 and not y.is_floating_point()) or isinstance(
        y, list
    )
    if not labels_ok or len(y) != len(x):
        raise UserError(
            f"attack {name!r}: y must hold {len(x)} integer labels (one entry per image), "
            f"got {getattr(y, 'shape', type(y).__name__)!r}"
        )
    # Attacks clamp to [0, 1]; normalised inputs would be silently destroyed.
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise UserError(f"attack {name!r}: pixels must be in [0, 1]; put normalisation inside the model")


def parse_eps(value: float | int | str) -> float:
    """A perturbation radius from a number or a string such as ``"8/255"`` or ``"0.03"``.

    Raises:
        UserError: not a number or fraction, not finite, or negative.
    """
    try:
        eps = float(Fraction(value.strip())) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise UserError(f"eps must be a number or a fraction like '8/255', got {value!r}") from None
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a finite number >= 0, got {value!r}")
    return eps


def predict(model: Classifier, x: torch.Tensor, batch_size: int | None = None) -> Any:
    """Outputs of ``model`` on ``x`` without gradients, in chunks of ``batch_size``, on ``x``'s
    device (logits, or a tuple of tensors for a model with several outputs)."""
    chunks = [x] if batch_size is None else list(x.split(batch_size))
    with torch.no_grad():
        return concat(
            [map_outputs(lambda t: t.detach().to(x.device, torch.float32), model(c)) for c in chunks]
        )


def robust_accuracy(
    model: Classifier, x_adv: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> float:
    """Top-1 accuracy of ``model`` (runner or module) on ``x_adv``; 0.0 for an empty batch."""
    if len(y) == 0:
        return 0.0
    correct = int((predict(model, x_adv, batch_size).argmax(1).cpu() == y.cpu()).sum())
    return correct / len(y)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit[y] - max_{j != y} logit[j]`` per sample: positive while correctly classified."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return true - other


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block (attacks are crafted with BatchNorm statistics
    frozen, so adversarial batches never pollute them) and restore each module's own mode after.

    Modules are restored one by one (not with ``model.train(flag)``) because a caller may keep
    some submodules in a different mode than the root, e.g. frozen BatchNorm layers.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze the parameters while attacking: saves the backward pass through the weights and
    leaves their ``.grad`` untouched, so attacks are safe to call inside a training step."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
