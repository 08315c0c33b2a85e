"""The training loop shared by dense training, fine-tuning between pruning steps and fine-tuning."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from toolchain.recipe import TrainConfig
from toolchain.training.losses import batch_loss

log = logging.getLogger(__name__)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=num_workers,
        drop_last=False,
    )


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant" or total <= 1:
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))


def train_model(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Train ``model`` in place with SGD and a cosine (or constant) learning rate.

    Clean warm-up epochs come first (``cfg.warmup_epochs``), then ``cfg.loss`` (clean, PGD-AT
    or TRADES). Adversarial examples are crafted with the model in eval mode.

    Args:
        model: the classifier, taking [0, 1] pixels.
        loader: training batches ``(x, y)``.
        cfg: epochs, lr, loss and attack settings.
        seed: seeds the attacks' random starts (shuffling is the loader's own generator).
        desc: label for the progress bar and the log.

    Returns:
        One dict per epoch: ``{"epoch", "loss", "accuracy", "adversarial"}`` (accuracy on the
        inputs the loss saw: adversarial ones for PGD-AT).
    """
    model.to(device)
    if cfg.epochs == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    total = cfg.epochs * max(len(loader), 1)
    step = 0
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        adversarial = epoch >= cfg.warmup_epochs
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(
            loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, disable=None if progress else True
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step, total)
            loss, logits = batch_loss(model, x, y, cfg, adversarial=adversarial, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "adversarial": float(adversarial and cfg.loss != "clean"),
        }
        history.append(record)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f",
            desc,
            epoch + 1,
            cfg.epochs,
            *map(record.get, ("loss", "accuracy")),
        )
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return history


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``batches``."""
    was_training = model.training
    model.eval()
    seen = correct = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return correct / max(seen, 1)
