"""What every dataset loader returns, the registry they live in, and helpers they share.

Images are kept as one ``uint8`` tensor (N, C, H, W) per split: 4000 RGB 32x32 images are
12 MB, indexing is a view, and the conversion to float happens per item. Every loader is a
function registered in :data:`DATASETS` with the keyword-only signature of :data:`Loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from toolchain.errors import UserError
from toolchain.registry import Registry

# Mean/std are estimated on at most this many training images: enough for 3-4 stable
# decimals, and cheap even for 224x224 image folders.
STATS_SAMPLES = 2000


class ImageTensorDataset(Dataset):
    """Images held in a uint8 tensor; items are ``(float32 C x H x W in [0, 1], int label)``.

    ``images`` and ``labels`` stay public so that callers who want a whole batch at once
    (corruption suites, calibration) can slice them without a DataLoader.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])


class MaskTensorDataset(ImageTensorDataset):
    """Images with one label per pixel; items are ``(float32 C x H x W in [0, 1], int64 H x W)``.

    Masks are kept as ``uint8`` (N, H, W) (class ids below 255, ``255`` = ignore), an eighth of
    the memory int64 would take; the conversion happens per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        want = (images.shape[0], *images.shape[-2:])
        if labels.dtype != torch.uint8 or tuple(labels.shape) != want:
            raise ValueError(f"masks must be uint8 {want}, got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.images[index].float().div_(255.0), self.labels[index].to(torch.int64)


@dataclass(frozen=True)
class DataBundle:
    """A train and a validation split plus what a model needs to know about them.

    ``mean``/``std`` are per channel, in [0, 1] pixel units; they go into the model's
    ``Normalize`` layer so that exported engines take raw [0, 1] pixels. ``image_size`` is the
    width (and the height of square images); ``height`` is set for wider-than-tall images.
    ``task`` names the task its labels are for (:mod:`toolchain.tasks`). ``source`` is the
    folder the images were read from (``None`` for generated datasets): a run's stage keys
    cover a digest of its files, so changed images make the stages that read them run again.
    ``collate`` batches its items when torch's default cannot (detection: a list of per-image
    box dicts), for every loader made of it.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple[str, ...]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    height: int | None = None
    task: str = "classification"
    source: str | None = None
    collate: Callable[[list[Any]], Any] | None = None

    @property
    def input_hw(self) -> tuple[int, int]:
        """``(height, width)`` of every image."""
        return (self.height or self.image_size, self.image_size)


class Loader(Protocol):
    """The signature every registered dataset loader has."""

    def __call__(
        self,
        *,
        root: str | None,
        image_size: int | None,
        train_samples: int | None,
        val_samples: int | None,
        seed: int,
        task: str | None,
    ) -> DataBundle: ...


DATASETS: Registry[Loader] = Registry("dataset")


def check_task(dataset: str, task: str | None, supported: tuple[str, ...]) -> str:
    """The task ``dataset`` loads labels for: ``task``, or its first supported one when None.

    Raises:
        UserError: ``dataset`` has no labels for ``task``; the message names the ones it has.
    """
    if task is None:
        return supported[0]
    if task not in supported:
        raise UserError(
            f"dataset {dataset} has no labels for task {task} (it has: {', '.join(supported)}); "
            "choose a dataset for that task or change the task"
        )
    return task


def split_seed(seed: int, split: str) -> int:
    """A 63-bit seed for one split (and purpose) derived from the user's seed.

    Train and val must never share a random stream, and nearby user seeds must not give
    overlapping streams, so the seeds go through numpy's SeedSequence hash.
    """
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *split.encode()]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def cap_indices(total: int, cap: int | None, seed: int, split: str) -> torch.Tensor | None:
    """Indices of a deterministic random subset of ``cap`` items (sorted), or None for all.

    Raises:
        ValueError: ``cap`` is not positive (the recipe validates this before it gets here).
    """
    if cap is None or cap >= total:
        return None
    if cap < 1:
        raise ValueError(f"sample cap must be >= 1, got {cap}")
    generator = torch.Generator().manual_seed(split_seed(seed, f"cap-{split}"))
    return torch.randperm(total, generator=generator)[:cap].sort().values


def capped_split(
    images: torch.Tensor, labels: torch.Tensor, cap: int | None, seed: int, split: str, size: int | None
) -> ImageTensorDataset:
    """A split from whole uint8 arrays: a seeded subset of ``cap`` images, resized to ``size``."""
    keep = cap_indices(images.shape[0], cap, seed, split)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    if size is not None:
        images = resize_uint8(images, size)
    return ImageTensorDataset(images, labels)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) tensor to ``size`` x ``size`` (bilinear, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    # Chunks keep the float copy small when a large dataset is upsampled.
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) over the first :data:`STATS_SAMPLES` images.

    Loaders shuffle or subsample before calling this, so "first" is a fair sample. Values
    are rounded to 4 decimals to keep model specs readable, and std is floored so a constant
    channel cannot produce a division by zero inside ``Normalize``.
    """
    sample = images[:STATS_SAMPLES].to(torch.float64).div_(255.0)
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def make_bundle(
    name: str,
    train: ImageTensorDataset,
    val: ImageTensorDataset,
    class_names: tuple[str, ...],
    task: str = "classification",
    source: str | Path | None = None,
) -> DataBundle:
    """Assemble a :class:`DataBundle` from two uint8 datasets; mean/std come from ``train``;
    ``source`` is the folder the files were read from."""
    mean, std = channel_stats(train.images)
    height, width = train.images.shape[-2:]
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(class_names),
        class_names=class_names,
        channels=train.images.shape[1],
        image_size=width,
        mean=mean,
        std=std,
        name=name,
        height=height if height != width else None,
        task=task,
        source=None if source is None else str(source),
    )
