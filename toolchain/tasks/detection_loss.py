"""The detection training loss, for any detector that follows the output contract
(:mod:`toolchain.tasks.detection_ops`): ground truth is assigned to the priors the model
returns, so one loss serves anchor-based and anchor-free heads alike.

* **Assignment** (ATSS, Zhang et al., CVPR 2020, "Bridging the Gap Between Anchor-based and
  Anchor-free Detection via Adaptive Training Sample Selection"): per object, the 9 priors of
  each level (priors of one size) whose centres are closest to the object's centre are
  candidates; those whose IoU with it reaches the mean plus the standard deviation of the
  candidates' IoUs, and whose centre lies inside it, are its positives; a prior claimed by
  several objects goes to the one it overlaps most. Deviation from the paper: an object left
  with no positive (smaller than the stride) takes its best-overlapping candidate, so every
  object is learned.
* **Classification**: sigmoid focal loss (Lin et al., ICCV 2017; alpha 0.25, gamma 2) over every
  prior, one-hot on the positives' classes, normalised by the number of positives; priors
  whose centre lies in an ignored region (crowd, too small) and that are not positive take no
  classification loss.
* **Boxes**: GIoU loss (Rezatofighi et al., CVPR 2019) of the decoded boxes of the positives,
  weighted by their centerness target (FCOS, Tian et al., ICCV 2019).
* **Quality**: binary cross-entropy of the quality logit against the centerness target.

Per image ``classification + 2 * boxes + quality``; ``mean`` over the images of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from toolchain.tasks.detection_ops import Heads, box_iou, unpack

__all__ = ["assign", "centerness", "detection_loss", "sigmoid_focal_loss"]

CANDIDATES_PER_LEVEL = 9
BOX_WEIGHT = 2.0


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss per element (summed by the caller)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return weight * ce * (1 - p_t) ** gamma


def _centers(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def _inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(g, a)``: whether point ``a`` lies inside box ``g``."""
    x, y = points[None, :, 0], points[None, :, 1]
    return (
        (x > boxes[:, None, 0]) & (x < boxes[:, None, 2]) & (y > boxes[:, None, 1]) & (y < boxes[:, None, 3])
    )


def assign(priors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """ATSS assignment (see the module docstring).

    Args:
        priors: ``(A, 4)`` prior boxes; gt: ``(g, 4)`` object boxes (g >= 1).

    Returns:
        ``(A,)`` the object each prior is assigned to, -1 for a negative.
    """
    centers = _centers(priors)
    distance = torch.cdist(_centers(gt), centers)  # (g, A)
    iou = box_iou(gt, priors)  # (g, A)
    sizes = (priors[:, 2] - priors[:, 0]).round(decimals=3)
    candidates = torch.zeros_like(iou, dtype=torch.bool)
    for size in sizes.unique():
        level = (sizes == size).nonzero().squeeze(1)
        k = min(CANDIDATES_PER_LEVEL, len(level))
        nearest = distance[:, level].topk(k, dim=1, largest=False).indices
        candidates[torch.arange(len(gt))[:, None], level[nearest]] = True
    cand_iou = torch.where(candidates, iou, torch.nan)
    threshold = cand_iou.nanmean(1) + _nanstd(cand_iou)
    positive = candidates & (iou >= threshold[:, None]) & _inside(centers, gt)
    # An object with no positive takes its best candidate (objects smaller than the stride).
    lonely = ~positive.any(1)
    if lonely.any():
        best = torch.where(candidates, iou, -1.0).argmax(1)
        positive[lonely.nonzero().squeeze(1), best[lonely]] = True
    overlap = torch.where(positive, iou, -1.0)
    value, owner = overlap.max(0)
    return torch.where(value >= 0, owner, torch.full_like(owner, -1))


def _nanstd(values: torch.Tensor) -> torch.Tensor:
    mean = values.nanmean(1, keepdim=True)
    count = (~values.isnan()).sum(1).clamp_min(2)
    return ((values - mean) ** 2).nansum(1).div(count - 1).sqrt()


def centerness(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of ``points`` ``(m, 2)`` in their boxes ``(m, 4)``: 1 at the centre, 0 at
    an edge (and outside)."""
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr = torch.stack([left, right], 1).clamp_min(1e-6)
    tb = torch.stack([top, bottom], 1).clamp_min(1e-6)
    ratio = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return ratio.sqrt()


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import generalized_box_iou_loss

    # Degenerate predictions (x2 < x1) would make the GIoU undefined: order the corners.
    ordered = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])], 1)
    return generalized_box_iou_loss(ordered, target, reduction="none")


def _image_loss(h: Heads, i: int, target: dict[str, torch.Tensor]) -> torch.Tensor:
    scores, boxes, priors = h.scores[i], h.boxes[i], h.priors[i]
    labels_all, boxes_all = target["labels"].to(scores.device), target["boxes"].to(scores.device)
    ignore = target["ignore"].to(scores.device, torch.bool)
    gt, labels = boxes_all[~ignore], labels_all[~ignore]
    cls_target = torch.zeros_like(scores)
    weight = torch.ones(len(priors), device=scores.device)
    owner = assign(priors.detach(), gt) if len(gt) else torch.full((len(priors),), -1, device=scores.device)
    positive = owner >= 0
    if ignore.any():
        in_ignored = _inside(_centers(priors), boxes_all[ignore]).any(0)
        weight = torch.where(in_ignored & ~positive, 0.0, weight)
    cls_target[positive, labels[owner[positive]]] = 1.0
    count = max(int(positive.sum()), 1)
    loss = (sigmoid_focal_loss(scores, cls_target).sum(1) * weight).sum() / count
    if positive.any():
        matched = gt[owner[positive]]
        target_quality = centerness(_centers(priors[positive]), matched)
        box = _giou_loss(boxes[positive], matched)
        loss = loss + BOX_WEIGHT * (box * target_quality).sum() / target_quality.sum().clamp_min(1e-6)
        if h.quality is not None:
            loss = loss + F.binary_cross_entropy_with_logits(h.quality[i][positive, 0], target_quality)
    return loss


def detection_loss(out: Any, targets: list[dict[str, torch.Tensor]], reduction: str = "mean") -> torch.Tensor:
    """The detection loss of a batch (see the module docstring).

    Args:
        out: the detector's raw outputs; targets: one dict per image (``boxes``, ``labels``,
            ``ignore``).
        reduction: ``mean`` over the images, ``sum`` of them, or ``none`` (one per image).
    """
    heads = unpack(out)
    losses = torch.stack([_image_loss(heads, i, t) for i, t in enumerate(targets)])
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
