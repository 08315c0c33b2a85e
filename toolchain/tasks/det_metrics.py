"""COCO-style detection scores: mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP and recall.

The rules are the COCO evaluation's (Lin et al. 2014, the ``cocoeval`` protocol), written
out for tensors already in memory so no annotation file or extra dependency is needed:

* per image and class, detections are taken best score first (at most ``max_detections``)
  and each is matched greedily to the unmatched ground-truth box of its class with the
  highest IoU at or above the threshold; a box flagged ``ignore`` (crowd or too small) can
  absorb a detection, which then counts neither as a hit nor as a false positive;
* precision is made monotone (each point takes the best precision at any higher recall) and
  read at the 101 recall points 0, 0.01, ..., 1; AP is their mean, averaged over the ten IoU
  thresholds 0.50, 0.55, ..., 0.95;
* recall (AR@max_detections) is the recall reached at each threshold, averaged;
* a class with no ground truth in the set has no AP (``None``) and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from toolchain.tasks.detection_ops import box_iou

# float64 as COCO's own: a recall of exactly 0.35 must reach the 0.35 point, which float32 misses.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class DetectionScores:
    """Scores of one set of detections against its ground truth.

    Attributes:
        map: mean over classes with ground truth of AP@[.5:.95] (0.0 when no image has an
            object to find); map50 / map75: the same at IoU 0.5 / 0.75 alone;
        per_class_ap: class name to AP@[.5:.95], ``None`` for a class absent from the set;
        per_class_recall: class name to AR@max_detections, ``None`` likewise;
        images: how many images were scored.
    """

    map: float
    map50: float
    map75: float
    per_class_ap: dict[str, float | None]
    per_class_recall: dict[str, float | None]
    images: int


def _match_image(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For one image and class (detections already best first): per threshold and detection,
    whether it is a hit and whether it is ignored. Shapes ``(T, D)`` each.

    Overlap with an ignored box is measured as COCO measures it for a crowd region: the
    intersection over the detection's own area (a detection inside the region overlaps it
    fully, however large the region)."""
    t, d = len(IOU_THRESHOLDS), len(det_boxes)
    hit = np.zeros((t, d), dtype=bool)
    skip = np.zeros((t, d), dtype=bool)
    if d == 0 or len(gt_boxes) == 0:
        return hit, skip
    iou = box_iou(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes)).numpy()
    if gt_ignore.any():
        iou[:, gt_ignore] = _inside_share(det_boxes, gt_boxes[gt_ignore])
    for ti, threshold in enumerate(IOU_THRESHOLDS.tolist()):
        close = iou >= min(threshold, 1 - 1e-10)
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for di in range(d):
            # A real object still free comes first (best IoU); failing that an ignored one,
            # which may absorb any number of detections.
            for pool in (close[di] & ~gt_ignore & ~taken, close[di] & gt_ignore):
                if pool.any():
                    best = int(np.where(pool, iou[di], -1.0).argmax())
                    taken[best] = True
                    hit[ti, di] = True
                    skip[ti, di] = gt_ignore[best]
                    break
    return hit, skip


def _inside_share(det_boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Intersection of each detection with each region over the detection's area."""
    lt = np.maximum(det_boxes[:, None, :2], regions[None, :, :2])
    rb = np.minimum(det_boxes[:, None, 2:], regions[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = np.clip(det_boxes[:, 2] - det_boxes[:, 0], 0, None) * np.clip(
        det_boxes[:, 3] - det_boxes[:, 1], 0, None
    )
    return np.where(area[:, None] > 0, inter / np.maximum(area[:, None], 1e-12), 0.0)


def _precision_at_recall_points(tp: torch.Tensor, fp: torch.Tensor, positives: int) -> tuple[float, float]:
    """AP (101-point interpolated) and the final recall of one threshold's ranked hits."""
    if positives == 0:
        return 0.0, 0.0
    tp_sum, fp_sum = torch.cumsum(tp.double(), 0), torch.cumsum(fp.double(), 0)
    recall = tp_sum / positives
    precision = tp_sum / (tp_sum + fp_sum).clamp(min=1e-12)
    if len(precision) == 0:
        return 0.0, 0.0
    # Monotone envelope: the best precision at this recall or any higher one.
    precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    where = np.searchsorted(recall.numpy(), RECALL_POINTS, side="left")
    reached = where < len(precision)
    values = np.zeros(len(RECALL_POINTS))
    values[reached] = precision.numpy()[where[reached]]
    return float(values.mean()), float(recall[-1])


def coco_scores(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    class_names: Sequence[str],
    *,
    max_detections: int = 100,
) -> DetectionScores:
    """Score per-image ``predictions`` (``boxes`` xyxy, ``scores``, ``labels``) against
    ``targets`` (``boxes``, ``labels``, optional ``ignore``), image by image in order."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    t = len(IOU_THRESHOLDS)
    per_class_ap: dict[str, float | None] = {}
    per_class_recall: dict[str, float | None] = {}
    ap_rows: list[torch.Tensor] = []
    for c, name in enumerate(class_names):
        scores, hits, skips, positives = [], [], [], 0
        for pred, target in zip(predictions, targets, strict=True):
            gt_mask = target["labels"] == c
            gt_boxes = target["boxes"][gt_mask].double().numpy()
            ignore = target.get("ignore")
            gt_ignore = (
                ignore[gt_mask].bool().numpy() if ignore is not None else np.zeros(len(gt_boxes), bool)
            )
            positives += int((~gt_ignore).sum())
            det_mask = pred["labels"] == c
            det_scores = pred["scores"][det_mask].float()
            order = torch.argsort(det_scores, descending=True, stable=True)[:max_detections]
            hit, skip = _match_image(pred["boxes"][det_mask][order].double().numpy(), gt_boxes, gt_ignore)
            scores.append(det_scores[order])
            hits.append(torch.from_numpy(hit))
            skips.append(torch.from_numpy(skip))
        if positives == 0:
            per_class_ap[name] = per_class_recall[name] = None
            continue
        all_scores = torch.cat(scores) if scores else torch.zeros(0)
        rank = torch.argsort(all_scores, descending=True, stable=True)
        hit_all = torch.cat(hits, dim=1)[:, rank] if hits else torch.zeros(t, 0, dtype=torch.bool)
        skip_all = torch.cat(skips, dim=1)[:, rank] if skips else torch.zeros(t, 0, dtype=torch.bool)
        aps, recalls = [], []
        for ti in range(t):
            keep = ~skip_all[ti]
            tp = hit_all[ti][keep]
            ap, rec = _precision_at_recall_points(tp, ~tp, positives)
            aps.append(ap)
            recalls.append(rec)
        row = torch.tensor(aps, dtype=torch.float64)
        ap_rows.append(row)
        per_class_ap[name] = float(row.mean())
        per_class_recall[name] = float(sum(recalls) / len(recalls))
    if not ap_rows:
        return DetectionScores(0.0, 0.0, 0.0, per_class_ap, per_class_recall, len(targets))
    table = torch.stack(ap_rows)  # (classes with ground truth, thresholds)
    return DetectionScores(
        map=float(table.mean()),
        map50=float(table[:, 0].mean()),
        map75=float(table[:, 5].mean()),
        per_class_ap=per_class_ap,
        per_class_recall=per_class_recall,
        images=len(targets),
    )
