"""torch-pruning's dependency graph, corrected where it cannot follow channels.

:class:`PruningGraph` is ``tp.DependencyGraph`` with three fixes applied between tracing and
index mapping: ``chunk`` nodes get their real split sizes; reshapes that keep the channel axis
whole pass indices through unchanged; reshapes that split or merge the channel axis (channel
shuffles, attention heads) become *barriers*, where a group stops. :func:`group_problem` says
why a group must be left alone (a barrier, a frozen module, an unwrapped parameter whose
pruned axis is not the group's width).
"""

from __future__ import annotations

import math
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import shape_infer

from toolchain.pruning.structure import Structure


class PruningGraph(tp.DependencyGraph):
    """torch-pruning's dependency graph, with the reshapes it cannot map marked as barriers.

    Attributes:
        barriers: ``{node: what the reshape does}`` for reshapes that split or merge the channel
            axis; they pass indices through unchanged, and groups containing them are never
            pruned (:func:`group_problem`).
        structure: what :func:`~toolchain.pruning.structure.analyse` found for the model.
    """

    barriers: dict[Any, str]
    structure: Structure

    def _build_dependency(self, module2node: dict[Any, Any]) -> None:
        super()._build_dependency(module2node)
        for node in module2node.values():
            if node.type == ops.OPTYPE.SPLIT:
                _read_chunk_sizes(node)
        shape_infer.init_shape_information(self)  # split sizes, which channel inference needs
        self.barriers = {}
        for node in module2node.values():
            if node.type != ops.OPTYPE.RESHAPE:
                continue
            verdict = _reshape_verdict(self, node)
            if verdict == "identity":
                # The channel axis survives whole: indices pass through unchanged (torch-pruning
                # would otherwise guess a flattening from mismatched channel inferences).
                node.type = ops.OPTYPE.ELEMENTWISE
            elif verdict != "flatten":
                # Not a RESHAPE any more, so torch-pruning's index mapping leaves it alone, and
                # without dependencies of its own a group stops here (and is left alone).
                node.type = ops.OPTYPE.ELEMENTWISE
                node.dependencies = []
                self.barriers[node] = verdict


def _shape(grad_fn: Any, which: str) -> tuple[int, ...] | None:
    """Forward input (``_saved_self_sym_sizes``) or output (the gradient's metadata) shape."""
    try:
        if which == "in":
            return tuple(int(s) for s in grad_fn._saved_self_sym_sizes)
        return tuple(int(s) for s in grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def _keeps_axis(inp: tuple[int, ...], out: tuple[int, ...], size: int) -> bool:
    """Some axis of ``size`` survives the reshape whole (same elements before and after it)."""
    return any(
        a == size == b and math.prod(inp[:i]) == math.prod(out[:j])
        for i, a in enumerate(inp)
        for j, b in enumerate(out)
    )


def _flattens(inp: tuple[int, ...], out: tuple[int, ...], channels: int) -> bool:
    """``N x C x H x W <-> N x CHW``: torch-pruning maps these (one channel, HW features)."""
    if len(inp) == 4 and len(out) == 2:
        return inp[0] == out[0] and inp[1] == channels and out[1] == math.prod(inp[1:])
    if len(inp) == 2 and len(out) == 4:
        return inp[0] == out[0] and inp[1] == math.prod(out[1:])
    return False


def _reshape_verdict(graph: tp.DependencyGraph, node: Any) -> str:
    """``identity`` (the channel axis survives whole), ``flatten`` (``N x C x H x W <-> N x CHW``,
    which torch-pruning maps), or why the reshape is a barrier."""
    inp, out = _shape(node.grad_fn, "in"), _shape(node.grad_fn, "out")
    if inp is None or out is None or not node.inputs:
        return "flatten"  # nothing known: torch-pruning's own rules (it maps 2-D/4-D only)
    channels = shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
    if channels and _flattens(inp, out, channels):
        return "flatten"
    if channels and _keeps_axis(inp, out, channels):
        return "identity"
    return f"a reshape {inp} -> {out} splits or merges the channel axis (a channel shuffle, attention heads)"


class _ChunkNode:
    """Stands in for a ``chunk``'s autograd node, which records one split size where
    torch-pruning looks for the list of sizes (without it, torch-pruning guessed the sizes from
    the graph and got them wrong on ShuffleNet)."""

    def __init__(self, grad_fn: Any, sizes: list[int], dim: int) -> None:
        self._grad_fn = grad_fn
        self._saved_split_sizes = sizes
        self._saved_dim = dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grad_fn, name)


def _read_chunk_sizes(node: Any) -> None:
    grad_fn = node.grad_fn
    if hasattr(grad_fn, "_saved_split_sizes") or not hasattr(grad_fn, "_saved_split_size"):
        return
    try:
        size, step = int(grad_fn._saved_self_sym_sizes[grad_fn._saved_dim]), int(grad_fn._saved_split_size)
    except (AttributeError, IndexError, TypeError):
        return
    sizes = [step] * (size // step) + ([size % step] if size % step else [])
    node.grad_fn = _ChunkNode(grad_fn, sizes, int(grad_fn._saved_dim))

    # torch-pruning maps the i-th consumer to the i-th chunk: order consumers by the chunk they read.
    def chunk_of(consumer: Any) -> int:
        edges = getattr(consumer.grad_fn, "next_functions", ()) or ()
        return min((nr for fn, nr in edges if fn is grad_fn), default=len(sizes))

    node.outputs.sort(key=chunk_of)


#: The kinds of :func:`group_problem`.
RESHAPE, UNSUPPORTED, UNWRAPPED = "channel-splitting reshape", "unsupported module", "unwrapped parameter"
FOLDED, MULTIPLIER = "folded channels", "grouped convolution with a channel multiplier"


def group_problem(graph: PruningGraph, group: Any, names: dict[Any, str]) -> tuple[str, str] | None:
    """Why a dependency group must be left alone, as ``(kind, detail)``, or None if it can be pruned.

    A group is left alone when it reaches a channel-splitting reshape (:data:`RESHAPE`), a frozen
    module (:data:`UNSUPPORTED`), an unwrapped parameter whose pruned axis does not have the
    group's width (:data:`UNWRAPPED`), a layer whose channels torch-pruning ties to two different
    positions of the group (:data:`FOLDED`: a layer concatenated with a transform of itself, as
    in GhostNet's Ghost modules; removing the group's positions would remove that layer's
    channels twice and empty it), or the input side of a grouped convolution with more outputs
    than inputs per group (:data:`MULTIPLIER`: a depthwise convolution with a channel
    multiplier, as in FastViT's last stage; torch-pruning indexes its one input channel per
    group with the group's channel indices).
    """
    problem = _folded(group, names) or _multiplier(group, names)
    if problem is not None:
        return problem
    size = len(group[0].idxs)
    for item in group:
        node = item.dep.target
        if node in graph.barriers:
            return RESHAPE, f"{graph.barriers[node]} after {_upstream_name(node, names)!r}"
        module = node.module
        if type(module) in graph.structure.frozen:
            name = names.get(module, type(module).__name__)
            return UNSUPPORTED, f"{name!r} ({type(module).__name__}) {graph.structure.frozen[type(module)]}"
        if isinstance(module, nn.Parameter):
            dim = getattr(node, "pruning_dim", -1)
            if max(_plain_idxs(item.idxs), default=-1) >= module.shape[dim]:
                return UNWRAPPED, (
                    f"unwrapped parameter {names.get(module, 'parameter')!r} {tuple(module.shape)} "
                    f"does not have the group's {size} channels on axis {dim}"
                )
    return None


def _folded(group: Any, names: dict[Any, str]) -> tuple[str, str] | None:
    """A layer and the channel-keeping layer right after it (BatchNorm, depthwise conv) tied to
    different positions of the group."""
    roots: dict[Any, dict[int, int]] = {}
    for item in group:
        if item.root_idxs is not None and item.dep.handler.__name__ == "prune_out_channels":
            roots[item.dep.target] = dict(zip(_plain_idxs(item.idxs), _plain_idxs(item.root_idxs)))
    for node, mapping in roots.items():
        for follower in node.outputs:
            if not _keeps_channels(follower.module) or follower not in roots:
                continue
            after = roots[follower]
            if any(after.get(c, r) != r for c, r in mapping.items()):
                layer = names.get(node.module, str(node.name))
                return FOLDED, (
                    f"{layer!r} and the layer after it, {names.get(follower.module, '')!r}, are tied to "
                    "different positions of the group (a layer concatenated with a transform of itself, as "
                    "in Ghost modules): removing them would remove its channels twice"
                )
    return None


def _keeps_channels(module: Any) -> bool:
    """A layer whose output channel ``c`` is its input channel ``c`` (BatchNorm, depthwise conv)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups == module.in_channels == module.out_channels
    )


def _multiplier(group: Any, names: dict[Any, str]) -> tuple[str, str] | None:
    """A grouped convolution pruned on its inputs with more outputs than inputs per group."""
    for item in group:
        module = item.dep.target.module
        if (
            isinstance(module, nn.modules.conv._ConvNd)
            and module.groups > 1
            and module.out_channels != module.in_channels
            and item.dep.handler.__name__ == "prune_in_channels"
        ):
            name = names.get(module, type(module).__name__)
            return MULTIPLIER, (
                f"{name!r} ({type(module).__name__}, groups={module.groups}, {module.in_channels} -> "
                f"{module.out_channels} channels) cannot lose input channels the way torch-pruning maps them"
            )
    return None


def _plain_idxs(idxs: Any) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _upstream_name(node: Any, names: dict[Any, str]) -> str:
    """The nearest named layer feeding ``node`` (reshapes themselves have no name)."""
    stack, seen = list(node.inputs), set()
    while stack:
        current = stack.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if current.module in names:
            return names[current.module]
        stack.extend(current.inputs)
    return "the input"
