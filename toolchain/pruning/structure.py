"""What torch-pruning must not look into, found by running the model: the parts of a network
whose channels cannot be followed, and the modules only training runs.

torch-pruning follows channels through the autograd graph of one traced forward pass. Three
kinds of structure defeat it, and a user's model may have any of them:

* **Modules that use their layers' weights directly** (torchvision's Swin attention calls
  ``F.linear(x, self.qkv.weight)``; ``nn.MultiheadAttention`` its ``out_proj.weight``): the
  layers are never called, so their channels are invisible, and the reshapes inside (heads,
  windows) made torch-pruning's index mapping recurse until memory ran out (21 GB on swin_t).
  Such a module is traced as *one* node, its inputs to its outputs: if torch-pruning has a
  pruner for its type (``nn.MultiheadAttention``) it is pruned as a unit; otherwise it is
  *frozen*: every group that reaches it is left alone.
* **Reshapes that split or merge the channel axis** (ShuffleNet's channel shuffle views
  ``N x C x H x W`` as ``N x g x C/g x H x W``): torch-pruning's index mapping only knows
  flattening, and crashed on the shuffle. Such a reshape is marked a *barrier*: groups through
  it are left alone (a shuffle interleaves the groups it joins, so no channel subset survives
  it consistently anyway).
* **Modules that run only in train mode** (GoogLeNet's and Inception's auxiliary heads): an
  eval-mode trace never sees which channels they consume. When a model has them, graphs are
  traced in train mode (state restored afterwards) so the channels they consume are pruned
  with everything else; their own outputs are never pruned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from toolchain.errors import UserError

#: Batch used for train-mode traces: BatchNorm in train mode refuses one value per channel.
TRAIN_TRACE_BATCH = 2


@dataclass
class Structure:
    """What :func:`analyse` found.

    Attributes:
        units: modules traced as one node and pruned by torch-pruning's own pruner for them.
        frozen: module classes traced as one node that nothing may prune through, with why.
        training_only: top-most modules that run in train mode but not in eval mode.
    """

    units: list[nn.Module] = field(default_factory=list)
    frozen: dict[type[nn.Module], str] = field(default_factory=dict)
    training_only: list[nn.Module] = field(default_factory=list)


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def batched(example_inputs: Any, batch: int) -> Any:
    """``example_inputs`` with every tensor of fewer than ``batch`` samples repeated to ``batch``."""
    if isinstance(example_inputs, Tensor) and example_inputs.dim() >= 1 and len(example_inputs) < batch:
        return example_inputs.expand(batch, *example_inputs.shape[1:]).clone()
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(batched(x, batch) for x in example_inputs)
    return example_inputs


def _called_modules(model: nn.Module, example_inputs: Any, *, train: bool) -> tuple[set[nn.Module], Any]:
    """Modules called in one forward pass (in train or eval mode), and the output."""
    called: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda m, _i: called.add(m)) for m in model.modules()]
    try:
        with state_restored(model), torch.enable_grad():
            model.train(train)
            output = _forward(model, batched(example_inputs, TRAIN_TRACE_BATCH) if train else example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return called, output


def _used_parameters(output: Any) -> set[int]:
    """ids of the parameters the output's autograd graph reaches."""
    used: set[int] = set()
    seen: set[Any] = set()
    stack: list[Any] = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            used.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return used


def analyse(model: nn.Module, example_inputs: Any) -> Structure:
    """Find the units, frozen modules and training-only modules of ``model`` (see module doc).

    Runs one eval-mode and one train-mode forward pass; the model's state (BatchNorm
    statistics, modes, the RNG) is restored afterwards.
    """
    structure = Structure()
    called, output = _called_modules(model, example_inputs, train=False)
    used = _used_parameters(output)
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in used]
        if module in called or not own:
            continue
        user = parents.get(module)
        while user is not None and user not in called:
            user = parents.get(user)
        if user is None or user is model:
            continue
        if isinstance(user, nn.MultiheadAttention):  # torch-pruning prunes it as a whole
            if user not in structure.units:
                structure.units.append(user)
        else:
            structure.frozen[type(user)] = (
                f"computes with the weights of layers it never calls (e.g. {_child_name(user, module)!r})"
            )
    for module in model.modules():
        reason = _known_frozen(module)
        if reason:
            structure.frozen[type(module)] = reason
    with contextlib.suppress(Exception):  # a model that cannot train fails the pre-flight check
        train_called, _ = _called_modules(model, example_inputs, train=True)
        only = [m for m in model.modules() if m in train_called and m not in called]
        structure.training_only = [m for m in only if parents.get(m) not in only]
    return structure


def _known_frozen(module: nn.Module) -> str | None:
    """Modules known to couple widths in a way no trace shows: torchvision's MaxViT attention
    reshapes its output with the width it read from its input's shape, so its input and output
    channels must keep their width (found by pruning it: the forward pass then failed)."""
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    if isinstance(module, RelativePositionalMultiHeadAttention):
        return "reshapes its output with the width of its input (read from the tensor's shape)"
    return None


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_modules():
        if module is child:
            return name
    return type(child).__name__


@contextlib.contextmanager
def state_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may move BatchNorm statistics or draw random numbers, then undo it:
    buffers, train/eval modes and the global RNG are as before."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield model
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes:
                module.training = training


class _OneNode(torch.autograd.Function):
    """Gives a module's output an autograd node whose only inputs are the module's inputs."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, *inputs: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        return (None,) * len(ctx.needs_input_grad)


def _as_one_node(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.requires_grad]

    def wrap(value: Any) -> Any:
        if isinstance(value, Tensor):
            return _OneNode.apply(value.detach(), *inputs)
        if isinstance(value, tuple):
            return tuple(wrap(v) for v in value)
        return value

    return wrap(output)


class _FrozenPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's handle on a frozen module: it has no channels of its own, and groups
    reaching it are left alone, so its prune functions must never run."""

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise UserError(f"{type(layer).__name__} cannot be pruned through (it is frozen)")

    def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise UserError(f"{type(layer).__name__} cannot be pruned through (it is frozen)")

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


@contextlib.contextmanager
def traced_as_nodes(model: nn.Module, structure: Structure) -> Iterator[dict[type[nn.Module], Any]]:
    """While the block runs, units and frozen modules produce single-node outputs.

    Yields:
        The customised pruners torch-pruning needs for the frozen classes.
    """
    targets = [m for m in model.modules() if m in structure.units or type(m) in structure.frozen]
    handles = [m.register_forward_hook(_as_one_node, with_kwargs=True) for m in targets]
    try:
        yield {cls: _FrozenPruner() for cls in structure.frozen}
    finally:
        for handle in handles:
            handle.remove()
