"""Datasets: every loader returns a :class:`DataBundle` of two uint8-backed splits.

Registered names: ``signs`` (procedural, zero setup), ``fashion-mnist`` (IDX files from the
Debian package), ``image-folder`` (your own class folders), ``cifar10`` (torchvision's
on-disk batches), for segmentation ``driving-scenes`` (procedural street scenes with
per-pixel labels) and ``cityscapes`` (Cityscapes-layout folders, 19 train classes), and for
detection ``driving-scenes`` again (``task="detection"``: boxes of its cars, pedestrians,
cyclists, signs and lights), ``kitti`` and ``coco`` (folders in those layouts).
Nothing is ever downloaded.

Items are ``(float32 C x H x W in [0, 1], int label)`` (an int64 ``H x W`` mask for
segmentation datasets, 255 where no class applies; a target dict of ``boxes``, ``labels``
and ``ignore`` for detection, see :mod:`toolchain.data.boxes`, batched by
``bundle.collate``); normalisation is not applied here but by the ``Normalize`` layer inside
the model, using ``bundle.mean``/``bundle.std``.
"""

from __future__ import annotations

from dataclasses import replace

from torch.utils.data import Dataset, Subset

# Importing the loader modules registers them in DATASETS.
from toolchain.data import (
    cifar10,
    cityscapes,
    coco,
    driving_scenes,
    fashion_mnist,
    image_folder,
    kitti,
    signs,
)
from toolchain.data.base import DATASETS, DataBundle, ImageTensorDataset
from toolchain.data.boxes import BoxTensorDataset
from toolchain.errors import UserError

__all__ = ["DATASETS", "BoxTensorDataset", "DataBundle", "ImageTensorDataset", "load_data"]
_LOADERS = (cifar10, cityscapes, coco, driving_scenes, fashion_mnist, image_folder, kitti, signs)


def load_data(
    name: str,
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    holdout: int | None = None,
    task: str | None = None,
) -> DataBundle:
    """Load the dataset registered as ``name``.

    Args:
        name: a registered dataset name (see ``DATASETS.names()``).
        root: where its files are (ignored by ``signs``; each loader documents its default).
        image_size: square side to resize to; each dataset has its own default.
        train_samples, val_samples: cap the splits to a seeded random subset (for ``signs``:
            how many images to generate; defaults 4000 and 1000).
        seed: fixes subsets, order and generated images.
        holdout: evaluate on this many images held out from the *training* split (disjoint
            from the ``train_samples`` kept for training) instead of the test split, so
            settings can be chosen without looking at the test set.
        task: the task to load labels for (``classification``, ``segmentation`` or
            ``detection``); ``None`` gives the dataset's own (the first it supports:
            ``driving-scenes`` gives segmentation masks unless asked for ``detection``).

    Returns:
        The :class:`DataBundle`.

    Raises:
        UnknownNameError: ``name`` is not registered; the message lists the known names.
        DataNotFoundError: the dataset's files are missing; the message says how to get them.
        UserError: the files exist but cannot be read, the dataset has no labels for ``task``,
            or the holdout leaves no training image.
        AnnotationError: a detection label file is unusable (the message names file and line).
    """
    loader = DATASETS.get(name)
    if holdout is None:
        return loader(
            root=root,
            image_size=image_size,
            train_samples=train_samples,
            val_samples=val_samples,
            seed=seed,
            task=task,
        )
    wanted = None if train_samples is None else train_samples + holdout
    bundle = loader(
        root=root, image_size=image_size, train_samples=wanted, val_samples=1, seed=seed, task=task
    )
    return _hold_out(bundle, holdout)


def _hold_out(bundle: DataBundle, holdout: int) -> DataBundle:
    """The last ``holdout`` training images become the validation split."""
    size = len(bundle.train)  # type: ignore[arg-type]
    if holdout >= size:
        raise UserError(
            f"data.holdout {holdout} leaves no training image ({bundle.name} train split: {size}); lower it"
        )
    cut = size - holdout
    whole = bundle.train
    train: Dataset
    val: Dataset
    if isinstance(whole, ImageTensorDataset):  # or its per-pixel subclass
        train, val = (
            type(whole)(whole.images[:cut], whole.labels[:cut]),
            type(whole)(whole.images[cut:], whole.labels[cut:]),
        )
    elif isinstance(whole, BoxTensorDataset):
        train, val = (
            BoxTensorDataset(whole.images[:cut], whole.labels[:cut]),
            BoxTensorDataset(whole.images[cut:], whole.labels[cut:]),
        )
    else:
        train, val = Subset(whole, range(cut)), Subset(whole, range(cut, size))
    return replace(bundle, train=train, val=val)
