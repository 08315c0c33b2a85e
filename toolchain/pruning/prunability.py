"""Before pruning: what can be pruned, what is left alone and why, and how far pruning can go.

:func:`assess` reads a model the way pruning will (the same dependency groups, the same cost
model) and reports the prunable groups and their channels, the layers left alone with the
reason (classifier head, training-only head, a module whose weights cannot be followed, a
channel-splitting reshape, an unwrapped parameter, a group too narrow), MACs and parameters
per layer, and the largest reduction reachable under ``max_layer_pruning`` (every group at its
floor, on the cost model pruning itself uses). ``robustprune inspect`` prints it; the pipeline
logs its warnings before training. :func:`check_forward` (and, with it,
:func:`toolchain.pruning.trial.check_removal`) catch, before any training, models whose forward
pass cannot run before (or after) pruning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning.budget import mask_for_fraction, pools_for
from toolchain.pruning.graph import classifier_layers
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.structure import TRAIN_TRACE_BATCH, analyse, batched, state_restored

logger = logging.getLogger(__name__)


@dataclass
class GroupReport:
    """A prunable group: its root layer, channels, positions (channels / tied channel groups),
    the positions it must keep, and the named layers it touches."""

    root: str
    channels: int
    positions: int
    tied: int
    floor: int
    layers: list[str]


@dataclass
class LeftAlone:
    """A layer (or a group rooted at it) whose output channels pruning keeps: the kind of
    obstacle and the detail."""

    layer: str
    channels: int
    kind: str
    reason: str


@dataclass
class LayerReport:
    """One counted layer (per call): dense MACs and parameters, and at every group's floor."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    macs: float
    params: float
    floor_macs: float
    floor_params: float


@dataclass
class Prunability:
    """What :func:`assess` found; ``to_dict`` is its JSON form."""

    input_shape: list[int]
    max_layer_pruning: float
    round_to: int | None
    dense_macs: float
    dense_params: float
    floor_macs: float
    floor_params: float
    groups: list[GroupReport] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    mask_methods: str | None = None

    @property
    def max_macs_reduction(self) -> float:
        return self.dense_macs / max(self.floor_macs, 1.0)

    @property
    def max_params_reduction(self) -> float:
        return self.dense_params / max(self.floor_params, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "max_macs_reduction": self.max_macs_reduction,
            "max_params_reduction": self.max_params_reduction,
        }

    def render(self, title: str, *, layers: bool = False) -> str:
        """The plain-text report ``robustprune inspect`` prints (per-layer costs with ``layers``)."""
        shape = "x".join(map(str, self.input_shape))
        lines = [
            f"{title} at {shape}: {_si(self.dense_macs)}MACs, {_si(self.dense_params)}params",
            "",
            f"prunable groups: {len(self.groups)} (root layer, channels, positions = channels / tied "
            "channel groups, positions it keeps at least, layers it touches)",
        ]
        for g in self.groups:
            touched = ", ".join(g.layers[:4]) + (f" +{len(g.layers) - 4}" if len(g.layers) > 4 else "")
            lines.append(f"  {g.root:<44} {g.channels:>6} {g.positions:>6} {g.floor:>6}  {touched}")
        lines += ["", f"left alone: {len(self.left_alone)} (layer, channels, why)"]
        for entry in self.left_alone:
            lines.append(f"  {entry.layer:<44} {entry.channels:>6}  {entry.kind}: {entry.reason}")
        if self.mask_methods:
            lines += ["", f"hydra, bap, dnr, gated: not for this model: {self.mask_methods}"]
        if layers:
            lines += [
                "",
                "per layer: name, kind, in, out, MACs, params, MACs and params with every group at its floor",
            ]
            for r in self.layers:
                lines.append(
                    f"  {r.name:<44} {r.kind:<18} {r.in_channels:>6} {r.out_channels:>6} {_si(r.macs):>9} "
                    f"{_si(r.params):>9} {_si(r.floor_macs):>9} {_si(r.floor_params):>9}"
                )
        rounding = f", round_to={self.round_to}" if self.round_to else ""
        lines += [
            "",
            f"largest reduction reachable (max_layer_pruning={self.max_layer_pruning}{rounding}, every group "
            f"at its floor): {self.max_macs_reduction:.2f}x fewer MACs ({_si(self.floor_macs)}MACs), "
            f"{self.max_params_reduction:.2f}x fewer params ({_si(self.floor_params)}params)",
        ]
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """One line per kind of obstacle (with up to three of its layers)."""
        by_kind: dict[str, list[LeftAlone]] = {}
        for entry in self.left_alone:
            by_kind.setdefault(entry.kind, []).append(entry)
        lines = []
        for kind, entries in by_kind.items():
            shown = ", ".join(e.layer for e in entries[:3])
            more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
            lines.append(
                f"{len(entries)} group(s) keep their channels ({kind}): {shown}{more}; {entries[0].reason}"
            )
        if self.mask_methods:
            lines.append(f"methods that train through masks cannot prune this model: {self.mask_methods}")
        return lines


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "


def assess(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    max_layer_pruning: float = 0.9,
    round_to: int | None = None,
) -> Prunability:
    """Read ``model`` the way pruning will (see the module docstring).

    Args:
        model: the dense model (not modified).
        example_inputs: one batch, ``1 x C x H x W``.
        max_layer_pruning, round_to: the recipe's constraints.

    Returns:
        The report.
    """
    structure = analyse(model, example_inputs)
    heads = classifier_layers(model, example_inputs)
    protected = [*heads, *structure.training_only]
    masks = ChannelMasks(model, example_inputs, protected, max_layer_pruning=max_layer_pruning, strict=False)
    return report(masks, heads, round_to)


def report(masks: ChannelMasks, heads: list[nn.Module], round_to: int | None) -> Prunability:
    """The :class:`Prunability` of the model ``masks`` was built on; ``heads`` are its classifier
    layers (the other layers masks were told to keep are its training-only modules)."""
    floor = mask_for_fraction(masks, masks.ones(), pools_for(masks, "layer"), 1.0, round_to)
    dense_cost, floor_cost = masks.cost(masks.ones()), masks.cost(floor)
    names = {module: name for name, module in masks.model.named_modules()}
    left = [
        LeftAlone(names[h], _width(h), "classifier head", "its outputs are the predictions (logits, boxes)")
        for h in heads
    ]
    left += [
        LeftAlone(names[m], _width(m), "training-only head", "runs in train mode only; its inputs are pruned")
        for m in masks.ignored
        if not any(m is h for h in heads)
    ]
    left += [LeftAlone(s.root, s.size, s.kind, s.reason) for s in masks.skipped]
    ext = torch.cat([floor, torch.ones(1)])
    layers = [
        LayerReport(
            layer.name,
            layer.kind,
            layer.in_width,
            layer.out_width,
            layer.dense_macs,
            layer.dense_params,
            float(layer.macs.value(ext, layer.in_width, layer.out_width)),
            float(layer.params.value(ext, layer.in_width, layer.out_width)),
        )
        for layer in masks.layers
    ]
    return Prunability(
        input_shape=list(masks.example_inputs.shape),
        max_layer_pruning=masks.max_layer_pruning,
        round_to=round_to,
        dense_macs=dense_cost[0],
        dense_params=dense_cost[1],
        floor_macs=floor_cost[0],
        floor_params=floor_cost[1],
        groups=[
            GroupReport(g.root, g.size, g.positions, g.ch_groups, g.floor, masks.members.get(g.key, []))
            for g in masks.groups
        ],
        left_alone=left,
        layers=layers,
        mask_methods=masks.unmaskable[0] if masks.unmaskable else None,
    )


def _width(module: nn.Module) -> int:
    for attribute in ("out_channels", "out_features", "embed_dim"):
        if isinstance(getattr(module, attribute, None), int):
            return int(getattr(module, attribute))
    return 0


@contextmanager
def _innermost_module(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Track the modules whose forward is running, so a failure can name the innermost one."""
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        yield failed
    except Exception:
        failed.extend(stack[-1:])
        raise
    finally:
        for handle in handles:
            handle.remove()


def check_forward(model: nn.Module, example_inputs: Tensor, *, what: str = "the model") -> None:
    """Run one eval-mode and one train-mode forward pass (the state restored afterwards).

    Raises:
        UserError: either pass fails; the message names the innermost module that was running.
    """
    for train in (False, True):
        x = batched(example_inputs, TRAIN_TRACE_BATCH) if train else example_inputs
        names = {module: name or type(model).__name__ for name, module in model.named_modules()}
        failed: list[nn.Module] = []
        try:
            with state_restored(model), _innermost_module(model) as failed, torch.no_grad():
                model.train(train)
                model(x)
        except Exception as exc:
            where = f" in {names[failed[0]]!r} ({type(failed[0]).__name__})" if failed else ""
            mode = "train" if train else "eval"
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(
                f"{what} fails on a {tuple(x.shape)} batch in {mode} mode{where}: "
                f"{type(exc).__name__}: {message}"
            ) from exc
