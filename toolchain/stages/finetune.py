"""``finetune``: adversarial fine-tuning of the pruned model (data parallel under torchrun)."""

from __future__ import annotations

from toolchain.rundir import FINETUNE, MODEL_FILE, PRUNE, PRUNED, TRAIN
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext, load_model, save_model, shared_model
from toolchain.stages.train import model_result
from toolchain.training import train_model
from toolchain.training.distill import DISTILL_LOSSES


class Finetune(Stage):
    """Trains the pruned model with the recipe's ``finetune`` section; its shape stays. The
    distillation losses (``ard``, ``rslad``) take the dense model as their teacher."""

    name = FINETUNE
    sections = ("finetune",)
    after = (PRUNE,)
    parallel = True

    def run(self, ctx: StageContext) -> StageOutput:
        model, shape = shared_model(ctx, PRUNE)
        # The distillation losses learn from the dense model (every rank needs it).
        teacher = shared_model(ctx, TRAIN)[0] if ctx.recipe.finetune.loss in DISTILL_LOSSES else None
        history = train_model(
            model,
            ctx.train_loader(seed_offset=2, shard=True),
            ctx.recipe.finetune,
            seed=ctx.recipe.seed + 100,
            desc=FINETUNE,
            section="finetune",
            progress=ctx.progress,
            device=ctx.device,
            checkpoint=ctx.checkpoint(FINETUNE),
            data_parallel=True,
            teacher=teacher,
        )
        model.cpu()
        save_model(ctx, FINETUNE, model, shape["history"], shape["structure"])
        ctx.models[PRUNED] = model
        return StageOutput([MODEL_FILE], model_result(ctx, model, history))

    def load(self, ctx: StageContext) -> None:
        ctx.models[PRUNED] = load_model(ctx, FINETUNE)
