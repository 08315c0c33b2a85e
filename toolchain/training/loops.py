"""The one training loop: dense training, fine-tuning, and every method's in-the-loop training.

Methods never copy the loop; they change it through :class:`TrainHooks`: parameter groups
(scores or gates with their own learning rate and weight decay, frozen weights), an extra loss
term, a per-batch perturbation that replaces the recipe's attack, and a callback after every
optimiser step (mask updates, rewiring, schedules).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from exporters.outputs import map_outputs
from toolchain import distributed
from toolchain.errors import TrainingDivergedError, UserError
from toolchain.killpoints import killpoint
from toolchain.recipe_train import TrainConfig
from toolchain.tasks import task_of, to_device
from toolchain.training.checkpoint import TrainCheckpoint, restore_rng, rng_states
from toolchain.training.losses import BatchLoss, Perturbation
from toolchain.training.sampling import ShardSampler
from toolchain.training.schedule import lr_factor, momentum_at

log = logging.getLogger(__name__)


@dataclass
class Step:
    """What a hook sees of the current optimisation step.

    Attributes:
        model, optimizer: the model being trained and its optimiser.
        x, y: the clean batch; logits: the logits the loss's accuracy is read from.
        loss: the loss of this step so far (the main loss, plus extra terms once added).
        step, total: 0-based step index and total steps of the run; epoch: 0-based epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor
    step: int
    total: int
    epoch: int


@dataclass
class TrainHooks:
    """How a pruning method changes the training loop (every field optional).

    Attributes:
        param_groups: ``model -> optimiser param groups``; a group may set its own ``lr``
            (scaled by the schedule like the base lr) and ``weight_decay``. Default: every
            parameter that requires grad, with the config's lr and weight decay.
        extra_loss: ``step -> tensor`` added to the loss before ``backward`` (L1 on gates, a
            contribution-difference term); may return None.
        perturb: ``(model, x, y) -> x_adv`` replacing the recipe's attack for ``pgd`` and
            ``hybrid`` losses, called in eval mode.
        after_step: ``step -> None`` after every optimiser step (gradients still present).
        metrics: ``() -> dict`` merged into each epoch's record (e.g. live channels).
        side_optimizer: ``() -> optimiser`` for parameters outside the model (gates with Adam),
            stepped with the main one; its learning rates follow the same schedule.
        state, load_state: the method's own state (masks, scores, momentum, RNG), saved in
            per-epoch checkpoints and restored when a run resumes.
    """

    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    extra_loss: Callable[[Step], torch.Tensor | None] | None = None
    perturb: Perturbation | None = None
    after_step: Callable[[Step], None] | None = None
    metrics: Callable[[], dict[str, float]] | None = None
    side_optimizer: Callable[[], torch.optim.Optimizer] | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    shard: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``; ``collate_fn`` batches
    items whose labels torch cannot stack (boxes per image), default torch's own.

    With ``shard`` under torchrun, rank ``r`` of ``n`` gets its share of the same shuffled order
    in batches of ``batch_size / n``, so the ranks' batches together are exactly the
    single-process run's batches of ``batch_size`` (see :mod:`toolchain.training.sampling`).

    Raises:
        UserError: ``batch_size`` is not a multiple of the number of processes.
    """
    world = distributed.current() if shard else distributed.World()
    if batch_size % world.size:
        raise UserError(
            f"data.batch_size {batch_size} is not a multiple of the {world.size} processes; "
            f"the global batch is split evenly: use a multiple of {world.size}"
        )
    generator = sampler = None
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]  # sized datasets only
        sampler = ShardSampler(order, world.rank, world.size)
    return DataLoader(
        dataset,
        batch_size=batch_size // world.size,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        drop_last=False,
        collate_fn=collate_fn,
    )


def _optimizer(model: nn.Module, cfg: TrainConfig, hooks: TrainHooks) -> torch.optim.Optimizer:
    if hooks.param_groups is not None:
        groups = hooks.param_groups(model)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for group in groups:
        group.setdefault("lr", cfg.lr)
        group["base_lr"] = group["lr"]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def _mixed_precision(
    cfg: TrainConfig, device: torch.device
) -> tuple[Callable[[], AbstractContextManager[Any]], torch.amp.GradScaler]:
    """Autocast for ``cfg.amp`` on CUDA (fp16 with a gradient scaler); plain fp32 elsewhere."""
    if cfg.amp == "off" or device.type != "cuda":
        if cfg.amp != "off":
            log.warning("train.amp=%s is for CUDA; training in fp32 on %s", cfg.amp, device)
        return nullcontext, torch.amp.GradScaler(enabled=False)
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return (
        lambda: torch.autocast(device_type="cuda", dtype=dtype),
        torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16"),
    )


def train_model(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    device: str | torch.device = "cpu",
    hooks: TrainHooks | None = None,
    checkpoint: TrainCheckpoint | None = None,
    data_parallel: bool = False,
    teacher: nn.Module | None = None,
    section: str | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with SGD on ``cfg.loss`` under ``cfg.schedule``.

    Clean warm-up epochs come first (``cfg.warmup_epochs``), then ``cfg.loss``. Adversarial
    examples are crafted with the model in eval mode.

    Args:
        model: the classifier, taking [0, 1] pixels.
        loader: training batches ``(x, y)``.
        cfg: epochs, optimiser, schedule, loss and attack settings.
        seed: seeds the attacks' random starts and mixed-noise draws (shuffling is the
            loader's own).
        desc: label for the progress bar and the log.
        hooks: a pruning method's changes to the loop.
        checkpoint: save the whole training state after every epoch and, if a checkpoint with
            the same key exists, resume after its epoch (bit-identical on CPU); removed once
            training completes.
        data_parallel: under torchrun, train with DistributedDataParallel across the process
            group (``loader`` then holds this rank's shard); every rank returns the same
            model and history, rank 0 alone writes the checkpoint.
        teacher: the dense model, for the distillation losses (``ard``, ``rslad``): the loss
            reads a frozen copy of it in eval mode on ``device``; ``teacher`` is not touched.
        section: the recipe key of ``cfg`` (``train``, ``finetune``, ...), named when training
            diverges; default ``desc``.

    Returns:
        One dict per epoch: ``{"epoch", "loss", "accuracy", "adversarial", "lr"}`` plus the
        hooks' metrics (accuracy on the inputs the loss reads: adversarial ones for PGD-AT),
        counted over every rank's images.

    Raises:
        UserError: a distillation loss without a ``teacher``, or for a detector.
        TrainingDivergedError: an epoch's loss was NaN or infinite (checked on the loss summed
            over every rank, so every rank raises); nothing of that epoch is saved.
    """
    hooks = hooks or TrainHooks()
    model.to(device)
    if cfg.epochs == 0:
        return []
    world = distributed.current() if data_parallel else distributed.World()
    # One forward per step goes through the wrapper (it synchronises gradients in backward);
    # attacks and other forward passes use the module itself.
    net: nn.Module = model
    synced: dict[str, type[nn.Module]] = {}
    if world.distributed:
        on_cuda = torch.device(device).type == "cuda"
        if cfg.sync_batchnorm and on_cuda:
            synced = distributed.sync_batchnorm(model)
        elif cfg.sync_batchnorm:
            log.warning("%s: sync_batchnorm needs CUDA; BatchNorm uses each rank's batch on %s", desc, device)
        net = DistributedDataParallel(model, device_ids=[torch.device(device)] if on_cuda else None)
    optimizer = _optimizer(model, cfg, hooks)
    optimizers = [optimizer]
    if hooks.side_optimizer is not None:
        optimizers.append(hooks.side_optimizer())
        for group in optimizers[-1].param_groups:
            group["base_lr"] = group["lr"]
    batch_loss = BatchLoss(cfg, perturb=hooks.perturb, teacher=teacher, device=device)
    autocast, scaler = _mixed_precision(cfg, torch.device(device))
    # Each rank draws its own random starts and noise; rank 0 draws what one process would.
    generator = torch.Generator().manual_seed(seed + 1_000_003 * world.rank)
    shuffle = getattr(loader, "generator", None)
    per_epoch = max(len(loader), 1)
    total = cfg.epochs * per_epoch
    state = _State(model, optimizers, batch_loss, hooks, generator, shuffle, world)
    start, history = state.resume(checkpoint, desc, cfg.epochs)
    step = start * per_epoch
    for epoch in range(start, cfg.epochs):
        adversarial = epoch >= cfg.warmup_epochs
        model.train()
        seen = correct = images = 0  # seen/correct count predictions: images, or pixels
        loss_sum = 0.0
        bar = tqdm(
            loader,
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if progress and world.main else True,
        )
        for x, y in bar:
            x, y = x.to(device), to_device(y, device)
            factor = lr_factor(cfg, step, total, per_epoch)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            for group in optimizer.param_groups:  # our SGD; a method's side optimiser keeps its own
                group["momentum"] = momentum_at(cfg, step, total)
            with autocast():
                loss, logits = batch_loss(
                    net, x, y, adversarial=adversarial, generator=generator, craft=model
                )
                step_info = Step(model, optimizer, x, y, logits, loss, step, total, epoch)
                if hooks.extra_loss is not None:
                    extra = hooks.extra_loss(step_info)
                    if extra is not None:
                        loss = step_info.loss = loss + extra
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            if hooks.after_step is not None:
                hooks.after_step(step_info)
            killpoint(f"step:{desc}")
            step += 1
            right, counted = task_of(model).hits(map_outputs(torch.Tensor.detach, logits), y)
            seen += counted
            correct += right
            images += len(y)
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / images:.3f}", acc=f"{correct / max(seen, 1):.3f}")
        if world.distributed:  # the epoch's numbers over every rank's images
            totals = distributed.all_sum([loss_sum, correct, seen, images], device)
            loss_sum, correct, seen, images = totals[0], int(totals[1]), int(totals[2]), int(totals[3])
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(images, 1),
            "accuracy": correct / max(seen, 1),
            "adversarial": float(adversarial and cfg.loss != "clean"),
            "lr": cfg.lr * factor,
        }
        _check_finite(record["loss"], epoch + 1, cfg, desc, section or desc)
        if hooks.metrics is not None:
            record.update(hooks.metrics())
        history.append(record)
        if checkpoint is not None and epoch + 1 < cfg.epochs:
            state.save(checkpoint, epoch + 1, history)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f",
            desc,
            epoch + 1,
            cfg.epochs,
            *map(record.get, ("loss", "accuracy")),
        )
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if checkpoint is not None and world.main:
        checkpoint.clear()
    distributed.local_batchnorm(model, synced)
    model.eval()
    return history


def _check_finite(loss: float, epoch: int, cfg: TrainConfig, desc: str, section: str) -> None:
    """A NaN or infinite epoch loss is the recipe's setting (too high a learning rate, mostly),
    not a bug: say which, and stop before it is saved or written anywhere."""
    if math.isfinite(loss):
        return
    raise TrainingDivergedError(
        f"{desc}: loss became {'NaN' if math.isnan(loss) else 'infinite'} at epoch {epoch}/{cfg.epochs}: "
        f"lower {section}.lr (now {cfg.lr:g}); the training diverged"
    )


@dataclass
class _State:
    """Everything a training run's next epoch depends on, saved to and restored from a checkpoint."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    batch_loss: BatchLoss
    hooks: TrainHooks
    generator: torch.Generator
    shuffle: torch.Generator | None
    world: distributed.World

    def _own(self) -> dict[str, Any]:
        """What differs between ranks: random generators and the loss's state."""
        return {"rng": rng_states(self.generator, self.shuffle), "loss": self.batch_loss.state_dict()}

    def save(self, checkpoint: TrainCheckpoint, epoch: int, history: list[dict[str, float]]) -> None:
        ranks = distributed.all_gather(self._own()) if self.world.distributed else [self._own()]
        if not self.world.main:
            return
        checkpoint.save(
            {
                "epoch": epoch,
                "history": history,
                "model": self.model.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "method": self.hooks.state() if self.hooks.state is not None else {},
                "ranks": ranks,
            }
        )

    def resume(
        self, checkpoint: TrainCheckpoint | None, desc: str, epochs: int
    ) -> tuple[int, list[dict[str, float]]]:
        """Restore the last saved epoch, if any: ``(epochs done, history so far)``.

        Under torchrun, rank 0 reads the file and sends it to the others (they need no shared
        file system); a checkpoint written by another number of processes is not resumed.
        """
        saved = checkpoint.load() if checkpoint is not None and self.world.main else None
        saved = distributed.broadcast(saved) if self.world.distributed else saved
        if saved is None or checkpoint is None:
            return 0, []
        ranks = saved.get("ranks", [])
        if not all(math.isfinite(h.get("loss", 0.0)) for h in saved.get("history", [])):
            # Saved by a version that went on training after a NaN loss: nothing to resume.
            log.warning(
                "%s: checkpoint %s holds a diverged training (NaN loss); starting over", desc, checkpoint.path
            )
            return 0, []
        if len(ranks) != self.world.size:
            log.info(
                "%s: checkpoint from %d process(es), this run has %d: starting over",
                desc,
                len(ranks),
                self.world.size,
            )
            return 0, []
        self.model.load_state_dict(saved["model"])
        for opt, opt_state in zip(self.optimizers, saved["optimizers"]):
            opt.load_state_dict(opt_state)
        own = ranks[self.world.rank]
        self.batch_loss.load_state_dict(own["loss"])
        if self.hooks.load_state is not None:
            self.hooks.load_state(saved["method"])
        restore_rng(own["rng"], self.generator, self.shuffle)
        start = int(saved["epoch"])
        log.info("%s: resuming after epoch %d/%d from %s", desc, start, epochs, checkpoint.path)
        return start, list(saved["history"])


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``batches`` (pixel accuracy for segmentation)."""
    was_training = model.training
    model.eval()
    seen = correct = 0
    task = task_of(model)
    for x, y in batches:
        right, counted = task.hits(model(x), y)
        correct += right
        seen += counted
    model.train(was_training)
    return correct / max(seen, 1)
