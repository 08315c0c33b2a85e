"""``train``: the dense model, trained from scratch or from the recipe's checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from toolchain import preflight
from toolchain.pruning import count_macs_params
from toolchain.pruning.graph import out_channels
from toolchain.recipe import Recipe
from toolchain.report.stage_results import ModelResult
from toolchain.rundir import DENSE, MODEL_FILE, TRAIN
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext, load_model, save_model
from toolchain.stages.inputs import InputDigests
from toolchain.training import train_model


class Train(Stage):
    """Builds the recipe's model for its data and trains it (data parallel under torchrun).

    Its key covers the digests of the files the recipe reads (checkpoint, dataset folder,
    factory source), so a changed file trains again.
    """

    name = TRAIN
    sections = ("task", "data", "model", "train")
    parallel = True

    def key_parts(self, recipe: Recipe, inputs: InputDigests) -> tuple[str, ...]:
        return inputs.key_parts()

    def run(self, ctx: StageContext) -> StageOutput:
        model = preflight.recipe_model(ctx.recipe, ctx.data)
        history = train_model(
            model,
            ctx.train_loader(shard=True),
            ctx.recipe.train,
            seed=ctx.recipe.seed,
            desc=TRAIN,
            section="train",
            progress=ctx.progress,
            device=ctx.device,
            checkpoint=ctx.checkpoint(TRAIN),
            data_parallel=True,
        )
        model.cpu()
        save_model(ctx, TRAIN, model, [])
        ctx.models[DENSE] = model
        return StageOutput([MODEL_FILE], model_result(ctx, model, history))

    def load(self, ctx: StageContext) -> None:
        ctx.models[DENSE] = load_model(ctx, TRAIN)


def model_result(ctx: StageContext, model: nn.Module, history: Sequence[Mapping[str, Any]]) -> ModelResult:
    """The record of a stage that saved a trained model: its epochs, size and channels."""
    macs, params = count_macs_params(model, ctx.example_inputs)
    return ModelResult(
        epochs=[dict(epoch) for epoch in history], macs=macs, params=params, channels=out_channels(model)
    )
