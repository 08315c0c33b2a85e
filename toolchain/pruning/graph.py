"""Glue around torch-pruning's dependency graph: tracing, MACs counting, the classifier head,
which groups can be pruned, history.

Everything here traces the model with ``example_inputs``. Tracing runs a forward pass, so it
never leaves a trace in the model: a forward in train mode would move BatchNorm running
statistics on the (random) example inputs and silently change the model, so graphs are traced
in eval mode, or in train mode with the state restored when the model has training-only heads.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from toolchain.errors import UserError
from toolchain.pruning.depgraph import PruningGraph
from toolchain.pruning.structure import (
    TRAIN_TRACE_BATCH,
    Structure,
    analyse,
    batched,
    state_restored,
    traced_as_nodes,
)
from toolchain.robustness.attacks.base import eval_mode

# Layers that can root a pruning group (tp's default minus LSTM, which vision models lack).
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)

HistoryEntry = list  # [module_name: str, is_out_channel_pruning: bool, indices: list[int]]


def run_forward(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` called on ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Count multiply-accumulates and parameters of one forward pass on ``example_inputs``.

    Args:
        model: any module; it is not modified and keeps its train/eval mode (torch-pruning's
            counter works on a deep copy).
        example_inputs: a tensor (or tuple of tensors) with the batch size to count for.

    Returns:
        ``(macs, params)`` as integers.
    """
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    return []


def classifier_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """Find the layer(s) whose outputs become the logits; pruning must never touch them.

    The forward pass is traced with hooks that remember the autograd node of every Conv and
    Linear output; walking the autograd graph back from the model output, the first such
    nodes met on each path are the heads. Parameter-free ops in between (pooling, flatten,
    dropout, activations, additions) are walked through, so a torchvision ``fc``, a
    ``classifier[-1]`` and a final 1x1 conv followed by global pooling are all found.

    Args:
        model: the dense model.
        example_inputs: inputs for one forward pass.

    Returns:
        The head modules, in model order; empty when no Conv/Linear feeds the output.
    """
    produced_by: dict[Any, nn.Module] = {}

    def remember(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced_by[output.grad_fn] = module

    layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    handles = [m.register_forward_hook(remember) for m in layers]
    try:
        # The input requires grad so the graph exists even when every parameter is frozen.
        inputs = _detach_requiring_grad(example_inputs)
        with eval_mode(model), torch.enable_grad():
            outputs = _output_tensors(run_forward(model, inputs))
    finally:
        for handle in handles:
            handle.remove()

    found: set[nn.Module] = set()
    seen: set[Any] = set()
    stack: list[Any] = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced_by:
            found.add(produced_by[node])
            continue  # the head's own inputs are features, not logits
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [m for m in layers if m in found]


@contextlib.contextmanager
def frozen_kept(model: nn.Module) -> Iterator[None]:
    """Keep the ``requires_grad`` flag of every parameter through torch-pruning's surgery, which
    replaces a pruned layer's parameters by new ones (trainable by default): a layer the user
    froze stays frozen once pruned."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])


def _detach_requiring_grad(example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.is_floating_point():
            return example_inputs.detach().clone().requires_grad_(True)
        return example_inputs
    if isinstance(example_inputs, dict):
        return {k: _detach_requiring_grad(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_detach_requiring_grad(v) for v in example_inputs)
    return example_inputs


def expand_ignored(layers: Sequence[nn.Module]) -> list[nn.Module]:
    """All submodules of ``layers``: torch-pruning matches ignored layers by identity."""
    expanded: list[nn.Module] = []
    for layer in layers:
        for sub in layer.modules():
            if not any(sub is seen for seen in expanded):
                expanded.append(sub)
    return expanded


def build_graph(model: nn.Module, example_inputs: Any, structure: Structure | None = None) -> PruningGraph:
    """Trace ``model`` into a dependency graph without changing its state.

    Modules using their layers' weights directly are traced as one node each, reshapes that
    split the channel axis become barriers, and a model with training-only modules (auxiliary
    heads) is traced in train mode with their outputs, so the channels they consume are in the
    graph; BatchNorm statistics, modes and the RNG are restored (see :mod:`.structure`).

    A single tensor is passed as a one-tuple: torch-pruning first tries ``model(*inputs)``,
    which for a bare ``1xCxHxW`` tensor would trace an *unbatched* ``CxHxW`` forward whenever
    the model happens to accept one.

    Args:
        model: the model; its parameters and buffers are not changed.
        example_inputs: a batch to trace with.
        structure: :func:`~toolchain.pruning.structure.analyse` of this model, if already known.

    Returns:
        The graph; ``graph.barriers`` and ``graph.structure`` say what it cannot follow.
    """
    structure = structure if structure is not None else analyse(model, example_inputs)
    train = bool(structure.training_only)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if train:
        example_inputs = batched(example_inputs, TRAIN_TRACE_BATCH)
    # The input requires grad so layers the user froze (requires_grad=False) still produce
    # autograd nodes, which is what torch-pruning traces: a frozen stem would otherwise be
    # invisible and never pruned.
    example_inputs = _detach_requiring_grad(example_inputs)

    def forward(module: nn.Module, inputs: Any) -> Any:
        module.train(train)  # torch-pruning switches to eval mode first
        return _forward_collecting(module, inputs, structure.training_only)

    graph = PruningGraph()
    graph.structure = structure
    with (
        state_restored(model),
        torch.enable_grad(),  # tracing needs autograd, even under no_grad
        traced_as_nodes(model, structure) as pruners,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
        try:
            graph.build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=forward,
                customized_pruners=pruners,
                verbose=False,
            )
        except UserError:
            raise
        except Exception as exc:
            raise _untraceable(exc) from exc
    return graph


def _untraceable(exc: Exception) -> UserError:
    """A crash inside torch-pruning's tracing, as one line naming where it happened."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "torch_pruning" in f.filename]
    where = f" in torch-pruning's {inside[-1].name}()" if inside else ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(
        f"torch-pruning cannot trace this model's channels ({type(exc).__name__}{where}: {detail}); "
        "the model runs, but an op in its forward is one torch-pruning does not follow: wrap that "
        "part in a module and list it in prune.ignored_layers, or report the op upstream"
    )


def _forward_collecting(model: nn.Module, inputs: Any, extra: Sequence[nn.Module]) -> Any:
    """The model's output plus the outputs of ``extra`` modules (train-only heads the model
    computes but may not return), so a trace from the output reaches them."""
    outputs: list[Any] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in extra]
    try:
        result = run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return (result, *outputs) if outputs else result


def protected_layers(
    model: nn.Module, example_inputs: Any, structure: Structure | None = None
) -> list[nn.Module]:
    """Layers whose output channels pruning must keep: the classifier head(s) and modules that
    run only in train mode (auxiliary heads: their inputs still follow the features they read).
    """
    structure = structure if structure is not None else analyse(model, example_inputs)
    return [*classifier_layers(model, example_inputs), *structure.training_only]


def resync(model: nn.Module) -> None:
    """Update attributes that copy a layer width after pruning changed it.

    torchvision's ViT reshapes the patch embedding with ``self.hidden_dim``; once its width is
    pruned the attribute must follow, or the forward pass asks for the old width.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.hidden_dim = int(module.conv_proj.out_channels)


def group_key(group: Any, names: dict[nn.Module, str]) -> tuple[str, str]:
    """A name for a pruning group that survives ``copy.deepcopy`` of the model.

    The key is the root layer's qualified name and the name of the root's pruning function
    (``prune_out_channels`` for every group torch-pruning enumerates), so scores computed on
    the real model can be looked up while pruning a copy of it.
    """
    dep = group[0].dep
    return names[dep.target.module], str(getattr(dep.handler, "__name__", dep.handler))


def plain_history(history: Sequence[Sequence[Any]]) -> list[HistoryEntry]:
    """Normalise torch-pruning's history to JSON types: ``[name, is_out, [int, ...]]``.

    torch-pruning may record indices as tensors or ``(idx, root_idx)`` named tuples; for the
    root layer of a group both are equal, so the plain index is kept.
    """
    plain: list[HistoryEntry] = []
    for name, is_out, idxs in history:
        indices = [int(getattr(i, "idx", i)) for i in idxs]
        plain.append([str(name), bool(is_out), indices])
    return plain


def out_channels(model: nn.Module, skip: Sequence[nn.Module] = ()) -> dict[str, int]:
    """Output channels of every Conv/Linear by name (the layers pruning can shrink)."""
    channels: dict[str, int] = {}
    for name, module in model.named_modules():
        if any(module is s for s in skip):
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            channels[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            channels[name] = int(module.out_features)
    return channels
