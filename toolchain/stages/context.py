"""What every stage works with (:class:`StageContext`), and how a stage's model is saved and
loaded (on one process, or on every rank of a torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from exporters.base import InputSpec
from toolchain import distributed
from toolchain.data import DataBundle
from toolchain.models import trusted_builder
from toolchain.pruning import load_pruned, read_pruned, rebuild_pruned, save_pruned
from toolchain.recipe import Recipe
from toolchain.rundir import RunDir, atomic_path
from toolchain.stages.inputs import InputDigests
from toolchain.tasks import Task, task_named
from toolchain.training import TrainCheckpoint, make_loader


@dataclass
class StageContext:
    """The recipe, the run folder, the data, where the work runs, and the models so far.

    Attributes:
        recipe: the validated recipe.
        run: the opened run directory (its layout names every path).
        data: the loaded datasets.
        inputs: digests of the files the run reads (checkpoint, dataset, factory source).
        keys: each stage's key for this run.
        progress: show progress bars.
        device: where training and the PyTorch runner run.
        world: this process's place under torchrun (one process otherwise).
        models: ``"dense"``/``"pruned"`` -> the PyTorch model, once its stage ran or was loaded.
    """

    recipe: Recipe
    run: RunDir
    data: DataBundle
    inputs: InputDigests = field(default_factory=InputDigests)
    keys: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    device: str = "cpu"
    world: distributed.World = field(default_factory=distributed.World)
    models: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def example_inputs(self) -> torch.Tensor:
        return torch.zeros(1, self.data.channels, *self.data.input_hw)

    @property
    def input_spec(self) -> InputSpec:
        height, width = self.data.input_hw
        return InputSpec(self.data.channels, height, width, None if self.recipe.export.dynamic_batch else 1)

    @property
    def task(self) -> Task:
        return task_named(self.recipe.task)

    def train_loader(self, seed_offset: int = 0, *, shard: bool = False) -> torch.utils.data.DataLoader:
        """Shuffled training batches; ``shard``: this rank's share under torchrun."""
        d = self.recipe.data
        return make_loader(
            self.data.train,
            d.batch_size,
            shuffle=True,
            seed=self.recipe.seed + seed_offset,
            num_workers=d.num_workers,
            shard=shard,
            collate_fn=self.data.collate,
        )

    def val_loader(
        self, batch_size: int | None = None, samples: int | None = None
    ) -> torch.utils.data.DataLoader:
        dataset = self.data.val
        if samples is not None and samples < len(dataset):  # type: ignore[arg-type]
            dataset = torch.utils.data.Subset(dataset, range(samples))
        return make_loader(
            dataset, batch_size or self.recipe.data.batch_size, shuffle=False, collate_fn=self.data.collate
        )

    def checkpoint(self, stage: str) -> TrainCheckpoint:
        """A stage's per-epoch training checkpoint; only a run with the same stage key resumes
        from it."""
        return TrainCheckpoint(self.run.checkpoint(stage), self.keys[stage])


def save_model(
    ctx: StageContext, stage: str, model: nn.Module, history: list[Any], structure: list[Any] | None = None
) -> None:
    """Save ``model`` as ``stage``'s model file (rank 0 only): spec, pruning history, weights."""
    if not ctx.world.main:
        return
    with atomic_path(ctx.run.model_file(stage)) as tmp:
        save_pruned(
            tmp,
            spec=model.spec,  # type: ignore[arg-type]
            history=history,
            state_dict=model.state_dict(),
            structure=structure,
        )


def load_model(ctx: StageContext, stage: str) -> nn.Module:
    """``stage``'s saved model, rebuilt from its spec and pruning history, in eval mode."""
    return load_with_history(ctx, stage)[0]


def load_with_history(ctx: StageContext, stage: str) -> tuple[nn.Module, dict[str, Any]]:
    """The stage's model and what rebuilds its shape (``history``, ``structure``)."""
    model, info = load_pruned(ctx.run.model_file(stage), trusted_builder(ctx.recipe), ctx.example_inputs)
    return model.eval(), info


def shared_model(ctx: StageContext, stage: str) -> tuple[nn.Module, dict[str, Any]]:
    """The stage's model on every rank: rank 0 reads the file and sends its spec, pruning
    history and weights; each rank rebuilds the pruned architecture from them (so the
    optimiser and DDP are created on the right shapes, and other nodes need no shared disk)."""
    path = ctx.run.model_file(stage)
    payload = read_pruned(path) if ctx.world.main else None
    if ctx.world.distributed:
        payload = distributed.broadcast(payload)
    assert payload is not None
    model, info = rebuild_pruned(
        payload, trusted_builder(ctx.recipe), ctx.example_inputs, source=repr(str(path))
    )
    return model.eval(), info
