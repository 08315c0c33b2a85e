"""What every stage of the pipeline works with: the recipe, the run folder, the data, where it
runs, and how a stage's saved model is loaded (on one process, or on every rank of a torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from exporters.base import InputSpec
from toolchain import distributed
from toolchain.data import DataBundle
from toolchain.models import trusted_builder
from toolchain.pruning import (
    load_pruned,
    read_pruned,
    rebuild_pruned,
)
from toolchain.recipe import Recipe
from toolchain.rundir import RunDir
from toolchain.tasks import Task, task_named
from toolchain.training import make_loader

MODEL_FILE = "model.pt"


@dataclass
class Context:
    """What every stage needs: the recipe, the run folder, the data and a progress switch."""

    recipe: Recipe
    run: RunDir
    data: DataBundle
    progress: bool = True
    keys: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    world: distributed.World = field(default_factory=distributed.World)

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
        )

    def val_loader(
        self, batch_size: int | None = None, samples: int | None = None
    ) -> torch.utils.data.DataLoader:
        dataset = self.data.val
        if samples is not None and samples < len(dataset):  # type: ignore[arg-type]
            dataset = torch.utils.data.Subset(dataset, range(samples))
        return make_loader(dataset, batch_size or self.recipe.data.batch_size, shuffle=False)


def load_model(ctx: Context, stage: str) -> nn.Module:
    return load_with_history(ctx, stage)[0]


def load_with_history(ctx: Context, stage: str) -> tuple[nn.Module, dict[str, Any]]:
    """The stage's model and what rebuilds its shape (``history``, ``structure``)."""
    model, info = load_pruned(
        ctx.run.root / stage / MODEL_FILE, trusted_builder(ctx.recipe), ctx.example_inputs
    )
    return model.eval(), info


def shared_model(ctx: Context, stage: str) -> tuple[nn.Module, dict[str, Any]]:
    """The stage's model on every rank: rank 0 reads the file and sends its spec, pruning
    history and weights; each rank rebuilds the pruned architecture from them (so the
    optimiser and DDP are created on the right shapes, and other nodes need no shared disk)."""
    path = ctx.run.root / stage / MODEL_FILE
    payload = read_pruned(path) if ctx.world.main else None
    if ctx.world.distributed:
        payload = distributed.broadcast(payload)
    assert payload is not None
    model, info = rebuild_pruned(
        payload, trusted_builder(ctx.recipe), ctx.example_inputs, source=repr(str(path))
    )
    return model.eval(), info
