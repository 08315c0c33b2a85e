"""Channel masks over torch-pruning dependency groups: train with them, then remove for real.

Methods that prune *while* training (HYDRA scores, BAP's gradual schedule, DNR's rewiring,
gates) share this mechanism. A :class:`ChannelMasks` holds one mask value per *position* of
every prunable dependency group (a position is a root channel; grouped convolutions tie the
same position across their channel groups, since they must lose the same positions in every
group). The mask multiplies the input of every layer that consumes the group's channels (the
next convolutions, the linear head, both sides of a residual sum or a concatenation), so a
zero mask value makes the network compute exactly what the physically pruned network
computes: nothing downstream ever sees the channel. BatchNorm and activations in between are
left alone (they act per channel).

The mask values come from a *source* the method owns (scores through a straight-through
top-k, sigmoid gates, a fixed binary buffer); the source is evaluated once per forward pass.

MACs and parameters of the masked model are computed from the masks by a cost model
calibrated on torch-pruning's own layer-wise counter: every counted layer costs
``a * in_live * out_live + b * out_live`` (convolutions, linear layers) or scales with the live
channels of its output (BatchNorm, activations, pooling), so a method can hold a budget while
it trains without copying the model. ``remove`` then turns the mask into a physical removal
by channel indices through torch-pruning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning.costs import Call, CallRecorder, LayerCost, Maps, cost_model, in_width
from toolchain.pruning.depgraph import PruningGraph, group_problem
from toolchain.pruning.graph import (
    ROOT_TYPES,
    HistoryEntry,
    build_graph,
    expand_ignored,
    frozen_kept,
    group_key,
    plain_history,
    resync,
)
from toolchain.pruning.structure import analyse

logger = logging.getLogger(__name__)

GroupKey = tuple[str, str]
MaskSource = Callable[[], Tensor]

_CONSUMERS = (nn.modules.conv._ConvNd, nn.Linear)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.PReLU)
# Normalisation over several channels: a masked channel still enters their statistics, so
# the masked model only approximates the pruned one until it is fine-tuned.
_CROSS_CHANNEL = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class MaskGroup:
    """One prunable dependency group.

    Attributes:
        key: ``(root layer name, pruning function name)``, as :func:`group_key`.
        root: the root layer's qualified name.
        size: channels of the root layer.
        ch_groups: channel groups tied together (grouped convolutions); 1 otherwise.
        offset: where the group's positions start in the flat mask vector.
        floor: positions that must stay (``max_layer_pruning``, at least one).
    """

    key: GroupKey
    root: str
    size: int
    ch_groups: int
    offset: int
    floor: int

    @property
    def positions(self) -> int:
        return self.size // self.ch_groups

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.positions)

    def channels(self, positions: Sequence[int]) -> list[int]:
        """Root channel indices of ``positions`` in every tied channel group."""
        return sorted(p + g * self.positions for g in range(self.ch_groups) for p in positions)


@dataclass(frozen=True)
class SkippedGroup:
    """A dependency group pruning leaves alone: its root layer, width, what kind of obstacle
    (``depgraph.RESHAPE``, ``UNSUPPORTED``, ``UNWRAPPED``, ``tied channel groups``, ``too
    narrow``) and the detail."""

    root: str
    size: int
    kind: str
    reason: str


def _tied_channel_groups(group: Any) -> int:
    """Channel grouping a group must respect (grouped convs, GroupNorm, attention heads: every
    head keeps the same width); depthwise is one-to-one."""
    groups = 1
    for item in group:
        layer = item.dep.target.module
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
            if layer.groups != layer.out_channels:
                groups = math.lcm(groups, layer.groups)
        elif isinstance(layer, nn.GroupNorm):
            groups = math.lcm(groups, layer.num_groups)
        elif isinstance(layer, nn.MultiheadAttention):
            groups = math.lcm(groups, layer.num_heads)
    return groups


def _trace(model: nn.Module, example_inputs: Tensor) -> tuple[PruningGraph, dict[nn.Module, list[Call]]]:
    """Build the dependency graph and remember, per call of each counted layer, its output's
    autograd node, channel width and shape.

    Both come from the same traced forward pass, so a layer can be matched to the graph node
    torch-pruning made for it even where tp wraps the op in a placeholder (activations). A
    layer called twice (torchvision's ResNet reuses one ReLU) is counted per call.
    """
    structure = analyse(model, example_inputs)  # its own forward passes are not recorded
    recorder = CallRecorder()
    with recorder.recording(model) as calls:
        graph = build_graph(model, example_inputs, structure)
    return graph, calls


def _consumes(graph: PruningGraph, item: Any) -> bool:
    """The item prunes a layer's *input* channels (per-channel layers prune both at once)."""
    handler = item.dep.handler
    return graph.is_in_channel_pruning_fn(handler) and not graph.is_out_channel_pruning_fn(handler)


def _plain(idxs: Any) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


class ChannelMasks:
    """Masks over every prunable group of ``model`` (the classifier head and ``ignored_layers`` stay).

    Args:
        model: the dense model; it is not modified until :meth:`attach` or :meth:`remove`.
        example_inputs: one batch (usually ``1xCxHxW``) to trace the graph and count MACs on.
        ignored_layers: layers whose output channels must stay (the head at least).
        max_layer_pruning: never remove more than this fraction of a group.
        strict: refuse groups whose channels a non per-channel layer mixes (attention,
            recurrent or custom layers); ``False`` keeps them, for the cost model only (the
            iterative method prunes physically and never applies masks).

    Raises:
        UserError: a group's channels are consumed by a layer masks cannot express (the message
            names it and suggests ``ignored_layers``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor,
        ignored_layers: Sequence[nn.Module],
        *,
        max_layer_pruning: float = 0.9,
        strict: bool = True,
        floors: Mapping[str, int] | None = None,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.ignored = list(ignored_layers)
        self.max_layer_pruning = max_layer_pruning
        names = {module: name for name, module in model.named_modules()}
        graph, calls = _trace(model, example_inputs)
        self.groups: list[MaskGroup] = []
        self.skipped: list[SkippedGroup] = []
        #: why methods that train through masks cannot handle a group (``strict`` raises the first)
        self.unmaskable: list[str] = []
        #: the named layers each prunable group touches
        self.members: dict[GroupKey, list[str]] = {}
        consumers: Maps = {}
        producers: Maps = {}
        unwrapped: dict[nn.Parameter, int] = {}  # parameter -> the axis torch-pruning prunes
        offset = 0
        for group in graph.get_all_groups(
            ignored_layers=expand_ignored(self.ignored), root_module_types=ROOT_TYPES
        ):
            size = len(group[0].idxs)
            key = group_key(group, names)
            problem = group_problem(graph, group, names)
            if problem:
                self.skipped.append(SkippedGroup(key[0], size, *problem))
                continue
            ch_groups = _tied_channel_groups(group)
            if size % ch_groups:
                reason = (
                    f"its {size} channels do not split into the {ch_groups} channel groups its layers tie"
                )
                self.skipped.append(SkippedGroup(key[0], size, "tied channel groups", reason))
                continue
            positions = size // ch_groups
            floor = max(1, math.ceil(positions * (1.0 - max_layer_pruning) - 1e-9))
            if floors is not None and key[0] in floors:
                floor = max(1, math.ceil(floors[key[0]] / ch_groups))
            if floor >= positions:
                reason = f"it must keep all {positions} of its positions"
                self.skipped.append(SkippedGroup(key[0], size, "too narrow", reason))
                continue
            entry = MaskGroup(key, key[0], size, ch_groups, offset, floor)
            unmaskable = self._mask_problem(group, names, entry)
            if unmaskable and strict:
                raise UserError(unmaskable)
            if unmaskable:
                self.unmaskable.append(unmaskable)
            self.members[key] = sorted(
                {names[i.dep.target.module] for i in group if i.dep.target.module in names}
            )
            for item in group:
                if item.root_idxs is None:
                    continue
                local, root = _plain(item.idxs), _plain(item.root_idxs)
                flat = [offset + r % positions for r in root]
                module = item.dep.target.module
                if _consumes(graph, item):
                    consumers.setdefault(module, []).append((local, flat))
                else:
                    # Layers are found by identity; activations and other ops tp wraps in its own
                    # placeholder nodes are found by the autograd node of their output.
                    producers.setdefault(module, []).append((local, flat))
                    if isinstance(module, nn.Parameter):
                        unwrapped[module] = int(getattr(item.dep.target, "pruning_dim", -1))
                    if item.dep.target.grad_fn is not None:
                        producers.setdefault(item.dep.target.grad_fn, []).append((local, flat))
            self.groups.append(entry)
            offset += positions
        self.total = offset
        self._by_key = {g.key: g for g in self.groups}
        indices = {module: self._index(module, in_width(module), maps) for module, maps in consumers.items()}
        self._consumer_index = {module: index for module, index in indices.items() if index is not None}
        self._costs, self._macs_const, self._params_const = self._cost_model(producers, calls, unwrapped)
        self._source: MaskSource | None = None
        self._ext: Tensor | None = None
        self._handles: list[Any] = []
        self._capture: list[tuple[Tensor, Tensor]] | None = None

    # --- construction ------------------------------------------------------------------------

    def _mask_problem(self, group: Any, names: dict[nn.Module, str], entry: MaskGroup) -> str | None:
        """Masks at consumers' inputs equal removal only if every other layer acts per channel."""
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
                continue
            if isinstance(module, _CONSUMERS + _PER_CHANNEL):
                continue
            name = names.get(module, type(module).__name__)
            if isinstance(module, _CROSS_CHANNEL):
                logger.debug(
                    "%s (%s) normalises across channels of group %r: the masked model only "
                    "approximates the pruned one until fine-tuning",
                    name,
                    type(module).__name__,
                    entry.root,
                )
                continue
            return (
                f"cannot mask the channels of {entry.root!r}: {name!r} ({type(module).__name__}) "
                "mixes them in a way channel masks cannot express; add it (or the layer feeding it) "
                "to the model's ignored_layers, or use prune.method: iterative"
            )
        return None

    def _index(self, module: nn.Module, width: int, maps: list[tuple[list[int], list[int]]]) -> Tensor | None:
        """Flat position of each of the layer's ``width`` channels (``total``: never masked);
        None if torch-pruning's channel indices do not fit the width seen (the cost stays fixed)."""
        if any(max(local, default=-1) >= width for local, _ in maps):
            logger.debug("%s: channel indices exceed its width %d; cost kept fixed", module, width)
            return None
        index = torch.full((width,), self.total, dtype=torch.long)
        for local, flat in maps:
            index[local] = torch.tensor(flat, dtype=torch.long)
        return index

    def _cost_model(
        self,
        producers: Maps,
        calls: dict[nn.Module, list[Call]],
        unwrapped: dict[nn.Parameter, int],
    ) -> tuple[list[LayerCost], float, float]:
        """Per counted layer, MACs and params as functions of its live input/output channels."""
        return cost_model(
            self.model, self.example_inputs, calls, self._consumer_index, producers, unwrapped, self._index
        )

    @property
    def layers(self) -> list[LayerCost]:
        """Every counted layer (per call) with its dense cost and its cost model."""
        return list(self._costs)

    # --- mask values ---------------------------------------------------------------------------

    def ones(self) -> Tensor:
        """A mask keeping every position."""
        return torch.ones(self.total)

    def group(self, key: GroupKey) -> MaskGroup:
        return self._by_key[key]

    def per_group(self, flat: Tensor) -> Iterator[tuple[MaskGroup, Tensor]]:
        """``(group, that group's slice of flat)`` for every group."""
        for g in self.groups:
            yield g, flat[g.span]

    def cost(self, mask: Tensor) -> tuple[float, float]:
        """MACs and parameters of the model with ``mask`` applied (0/1 values; soft ones give
        the expected cost)."""
        ext = torch.cat([mask.detach().float().cpu(), torch.ones(1)])
        macs, params = self._macs_const, self._params_const
        for layer in self._costs:
            macs += float(layer.macs.value(ext, layer.in_width, layer.out_width))
            params += float(layer.params.value(ext, layer.in_width, layer.out_width))
        return macs, params

    # --- applying masks during training ---------------------------------------------------------

    def attach(self, source: MaskSource) -> None:
        """Multiply every consumer's input by the mask ``source()`` gives, once per forward pass."""
        self.detach()
        self._source = source
        self._handles.append(self.model.register_forward_pre_hook(self._refresh))
        for module, index in self._consumer_index.items():
            self._handles.append(module.register_forward_pre_hook(self._masker(index)))

    def detach(self) -> None:
        """Remove the hooks; the model computes its dense function again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._source = None
        self._ext = None

    @contextmanager
    def attached(self, source: MaskSource) -> Iterator[ChannelMasks]:
        self.attach(source)
        try:
            yield self
        finally:
            self.detach()

    def _refresh(self, _module: nn.Module, inputs: Any) -> None:
        assert self._source is not None
        mask = self._source()
        first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        if first is not None and first.device != mask.device:
            mask = mask.to(first.device)  # sources live on the CPU; gradients flow back through .to
        self._ext = torch.cat([mask, mask.new_ones(1)])

    def _masker(self, index: Tensor) -> Callable[[nn.Module, Any], Any]:
        def apply(module: nn.Module, inputs: Any) -> Any:
            if self._ext is None:  # called outside the root model's forward
                return None
            x = inputs[0]
            where = index.to(self._ext.device)
            scale = self._ext[where]
            if isinstance(module, nn.Linear):
                out = x * scale
            else:
                out = x * scale.view([1, -1] + [1] * (x.dim() - 2))
            if self._capture is not None:
                self._capture.append((where, out))
            return (out, *inputs[1:])

        return apply

    @contextmanager
    def capture(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Record, for every consumer layer called inside the block, ``(position index per
        channel, masked input)``; the inputs keep their autograd graph."""
        self._capture = []
        try:
            yield self._capture
        finally:
            self._capture = None

    def per_position(self, values: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Average per-channel values ``(position index, value per channel)`` into one value per
        position (over the layers consuming it); differentiable."""
        total = torch.zeros(self.total + 1)
        count = torch.zeros(self.total + 1)
        for where, value in values:
            total = total.index_add(0, where.cpu(), value.float().cpu())
            count = count.index_add(0, where.cpu(), torch.ones(len(where)))
        return (total / count.clamp_min(1.0))[: self.total]

    @torch.no_grad()
    def fold(self, scale: Tensor) -> None:
        """Multiply each consumer's weights by ``scale`` per input position, so the model with
        no mask computes what it computed with the (soft) mask ``scale``."""
        ext = torch.cat([scale.detach().float().cpu(), torch.ones(1)])
        for module, index in self._consumer_index.items():
            s = ext[index]
            weight = module.weight  # type: ignore[union-attr]
            assert isinstance(weight, Tensor)
            if isinstance(module, nn.Linear):
                weight.mul_(s.to(weight).view(1, -1))
                continue
            assert isinstance(module, nn.modules.conv._ConvNd)
            groups = module.groups
            if module.transposed:  # (in, out / groups, *k)
                weight.mul_(s.to(weight).view(-1, *([1] * (weight.dim() - 1))))
                continue
            per_group = s.to(weight).view(groups, 1, -1, *([1] * (weight.dim() - 2)))
            shaped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
            shaped.mul_(per_group)

    # --- physical removal -------------------------------------------------------------------------

    def removal_plan(self, mask: Tensor) -> dict[GroupKey, list[int]]:
        """Root channel indices to remove per group: the positions whose mask value is 0."""
        plan: dict[GroupKey, list[int]] = {}
        for g, values in self.per_group(mask):
            dead = torch.nonzero(values <= 0).flatten().tolist()
            if len(dead) > g.positions - g.floor:
                raise ValueError(f"mask removes {len(dead)} of {g.positions} positions of {g.root!r}")
            if dead:
                plan[g.key] = g.channels(dead)
        return plan

    def remove(self, mask: Tensor) -> list[HistoryEntry]:
        """Physically remove the channels ``mask`` zeroes (hooks detached first).

        Returns:
            The torch-pruning history of the removal (JSON types), for ``save_pruned``.
        """
        self.detach()
        return remove_channels(self.model, self.example_inputs, self.removal_plan(mask))


def remove_channels(
    model: nn.Module, example_inputs: Tensor, plan: Mapping[GroupKey, Sequence[int]]
) -> list[HistoryEntry]:
    """Remove, with torch-pruning, the root channels ``plan`` names per group (by root layer name).

    Works on any model with the same layer names as the one the plan was made on (a copy).

    Returns:
        The torch-pruning history of the removal (JSON types).
    """
    graph = build_graph(model, example_inputs)
    modules = dict(model.named_modules())
    with frozen_kept(model):
        for (root, _), idxs in plan.items():
            layer = modules[root]
            group = graph.get_pruning_group(
                layer, graph.get_pruner_of_module(layer).prune_out_channels, list(idxs)
            )
            group.prune()
    resync(model)
    return plain_history(graph.pruning_history())
