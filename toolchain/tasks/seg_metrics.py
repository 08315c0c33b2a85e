"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy, per-class IoU.

``confusion[t, p]`` counts labelled pixels of true class ``t`` predicted as ``p``; pixels
labelled 255 (ignore) are left out. ``IoU_c = TP / (TP + FP + FN)``; mIoU is the mean over the
classes that occur in the labels or the predictions (a class absent from both has no IoU and
is reported as null), as Cityscapes' evaluation does over the images evaluated together.
"""

from __future__ import annotations

import torch

#: Label of pixels that belong to no class (Cityscapes' convention): no loss, no metric.
IGNORE_INDEX = 255


def confusion(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts of (true, predicted) over labelled pixels.

    Args:
        pred: predicted class per pixel (any shape); y: labels of the same shape (255 = ignore).
    """
    valid = y != IGNORE_INDEX
    index = y[valid].to(torch.int64) * num_classes + pred[valid].to(torch.int64)
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def class_iou(matrix: torch.Tensor) -> list[float | None]:
    """IoU per class; None for a class neither labelled nor predicted."""
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return [float(t / u) if u > 0 else None for t, u in zip(tp, union)]


def mean_iou(matrix: torch.Tensor) -> float:
    """Mean IoU over the classes that have one; 0.0 when no pixel was counted."""
    values = [v for v in class_iou(matrix) if v is not None]
    return sum(values) / len(values) if values else 0.0


def pixel_accuracy(matrix: torch.Tensor) -> float:
    """Share of labelled pixels predicted correctly (exact integer ratio)."""
    total = int(matrix.sum())
    return int(matrix.diagonal().sum()) / total if total else 0.0
