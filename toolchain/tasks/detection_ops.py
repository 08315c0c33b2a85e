"""What the detection task computes on a detector's raw outputs, identically after every runtime.

The output contract (every detector: the built-in ``detnet``, wrapped torchvision detectors, a
user's factory): a tuple ``(scores, boxes, priors)`` or ``(scores, boxes, priors, quality)``
with the batch first and one row per prior (anchor or location) ``A``:

* ``scores`` ``(N, A, K)``: class logits, one independent (sigmoid) score per class, no
  background column;
* ``boxes`` ``(N, A, 4)``: the prior's box, decoded in the graph, ``x1, y1, x2, y2`` in input
  pixels;
* ``priors`` ``(N, A, 4)``: the priors themselves (the same for every image), so training can
  assign ground truth to them without knowing how the model made them;
* ``quality`` ``(N, A, 1)``, optional: a localisation-quality logit (FCOS's centerness), which
  multiplies the class score: ``score = sqrt(sigmoid(class) * sigmoid(quality))``.

Post-processing (:func:`postprocess`) is the task's: scores above :data:`SCORE_THRESHOLD`, the
best :data:`PRE_NMS_TOP_K` per image, non-maximum suppression per class at :data:`NMS_IOU`,
at most :data:`MAX_DETECTIONS` per image. An object counts as *found* when a detection of its
class with a score of at least :data:`OPERATING_SCORE` overlaps it at IoU 0.5 or more
(recall, attacks' success, vanishing): the operating point of a deployed detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MAX_DETECTIONS",
    "NMS_IOU",
    "OPERATING_SCORE",
    "SCORE_THRESHOLD",
    "Detections",
    "Heads",
    "box_iou",
    "found",
    "postprocess",
    "unpack",
]

SCORE_THRESHOLD = 0.05
PRE_NMS_TOP_K = 1000
NMS_IOU = 0.6
MAX_DETECTIONS = 100
#: The score a detection needs for its object to count as found (recall, attacks, vanishing).
OPERATING_SCORE = 0.3
#: Overlap at which a detection finds an object.
FOUND_IOU = 0.5


@dataclass(frozen=True)
class Heads:
    """A detector's raw outputs, unpacked (see the module docstring)."""

    scores: torch.Tensor
    boxes: torch.Tensor
    priors: torch.Tensor
    quality: torch.Tensor | None


def unpack(out: Any) -> Heads:
    """The four parts of a detector's output tuple.

    Raises:
        ValueError: not a tuple of 3 or 4 tensors with matching ``(N, A, .)`` shapes.
    """
    if not isinstance(out, tuple | list) or len(out) not in (3, 4):
        raise ValueError(f"a detector returns (scores, boxes, priors[, quality]), got {type(out).__name__}")
    scores, boxes, priors = out[0], out[1], out[2]
    quality = out[3] if len(out) == 4 else None
    n, a = scores.shape[:2]
    shapes_ok = (
        scores.dim() == 3
        and tuple(boxes.shape) == (n, a, 4)
        and tuple(priors.shape[1:]) == (a, 4)
        and (quality is None or tuple(quality.shape) == (n, a, 1))
    )
    if not shapes_ok:
        raise ValueError(
            "detector outputs must be scores (N, A, K), boxes (N, A, 4), priors (N, A, 4)"
            f"[, quality (N, A, 1)], got {[tuple(t.shape) for t in out]}"
        )
    return Heads(scores, boxes, priors, quality)


def class_scores(o: Heads) -> torch.Tensor:
    """Per prior and class, the detection score in [0, 1] (quality folded in when present)."""
    probs = o.scores.sigmoid()
    if o.quality is None:
        return probs
    return (probs * o.quality.sigmoid()).clamp_min(0).sqrt()


@dataclass(frozen=True)
class Detections:
    """One image's detections after post-processing, best first.

    Attributes:
        boxes: ``(m, 4)`` xyxy pixels; scores: ``(m,)``; labels: ``(m,)`` class indices;
        priors: ``(m,)`` the prior each came from (for attacks that target it).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    priors: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The form metrics take: ``boxes``, ``scores``, ``labels``."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}

    def confident(self, score: float = OPERATING_SCORE) -> Detections:
        keep = self.scores >= score
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.priors[keep])


def postprocess(out: Any) -> list[Detections]:
    """Detections per image: threshold, top-k, per-class NMS, at most :data:`MAX_DETECTIONS`."""
    from torchvision.ops import batched_nms  # lazy: torchvision takes a second to import

    o = unpack(out)
    probs = class_scores(o).detach().float()
    boxes = o.boxes.detach().float()
    n, _, k = probs.shape
    result = []
    for i in range(n):
        flat = torch.nan_to_num(probs[i].reshape(-1), nan=0.0)
        candidates = (flat > SCORE_THRESHOLD).nonzero().squeeze(1)
        if len(candidates) > PRE_NMS_TOP_K:
            candidates = candidates[flat[candidates].topk(PRE_NMS_TOP_K).indices]
        prior, label = candidates // k, candidates % k
        scores, chosen = flat[candidates], boxes[i][prior]
        finite = torch.isfinite(chosen).all(1)
        prior, label, scores, chosen = prior[finite], label[finite], scores[finite], chosen[finite]
        keep = batched_nms(chosen, scores, label, NMS_IOU)[:MAX_DETECTIONS]
        result.append(Detections(chosen[keep], scores[keep], label[keep], prior[keep]))
    return result


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` ``(m, 4)`` with every box of ``b`` ``(n, 4)``: ``(m, n)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def found(detections: Detections, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per object of ``target`` that is not ignored, whether a confident detection of its class
    overlaps it at IoU :data:`FOUND_IOU` or more."""
    keep = ~target["ignore"].bool()
    boxes, labels = target["boxes"][keep], target["labels"][keep]
    sure = detections.confident()
    if len(boxes) == 0 or len(sure.boxes) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool)
    iou = box_iou(boxes, sure.boxes)
    same = labels[:, None] == sure.labels[None, :]
    return ((iou >= FOUND_IOU) & same).any(1)


def match(
    reference: Detections, candidate: Detections, *, iou: float = 0.99, score_atol: float = 1e-3
) -> tuple[int, int, int]:
    """Detection parity between two runtimes' post-processed outputs of one image.

    Every detection of either side is one unit. Reference detections are matched greedily
    (best score first) to candidate detections of the same class with IoU >= ``iou`` and scores
    within ``score_atol``: a matched pair is two agreeing units. What stays unmatched agrees only
    when rounding explains it (a *tie*): a detection within ``score_atol`` of the score
    threshold (one side kept it, the other dropped it), or two overlapping detections (IoU at
    least the NMS IoU) of one class whose scores differ by less than ``score_atol``, of which
    NMS kept one on one side and the other on the other (two units).

    Returns:
        ``(agreeing, compared, ties)`` in units; ``compared`` is the detections of both sides.
    """
    compared = len(reference.boxes) + len(candidate.boxes)
    taken = torch.zeros(len(candidate.boxes), dtype=torch.bool)
    unmatched = []
    agree = 0
    overlap = box_iou(reference.boxes, candidate.boxes) if len(candidate.boxes) else None
    for r in range(len(reference.boxes)):
        ok = torch.zeros(len(candidate.boxes), dtype=torch.bool)
        if overlap is not None:
            ok = (
                (candidate.labels == reference.labels[r])
                & (overlap[r] >= iou)
                & ((candidate.scores - reference.scores[r]).abs() <= score_atol)
                & ~taken
            )
        if ok.any():
            taken[int(ok.nonzero()[0])] = True
            agree += 2
        else:
            unmatched.append(r)
    ties = _ties(reference, candidate, unmatched, ~taken, score_atol)
    return agree + ties, compared, ties


def _ties(
    reference: Detections, candidate: Detections, unmatched: Sequence[int], free: torch.Tensor, atol: float
) -> int:
    """Units of unmatched detections that rounding explains (see :func:`match`)."""
    ties = 0
    free = free.clone()
    for r in unmatched:
        score = float(reference.scores[r])
        twin = torch.zeros_like(free)
        if free.any():
            overlap = box_iou(reference.boxes[r : r + 1], candidate.boxes)[0]
            twin = (
                free
                & (candidate.labels == reference.labels[r])
                & (overlap >= NMS_IOU)
                & ((candidate.scores - score).abs() <= atol)
            )
        if twin.any():
            free[int(twin.nonzero()[0])] = False
            ties += 2
        elif abs(score - SCORE_THRESHOLD) <= atol:
            ties += 1
    # Candidate detections the reference dropped at the threshold.
    ties += int((free & ((candidate.scores - SCORE_THRESHOLD).abs() <= atol)).sum())
    return ties
