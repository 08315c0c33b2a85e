"""``detection``: boxes and classes per image, from a detector's raw outputs.

The model returns raw heads (:mod:`toolchain.tasks.detection_ops`: class logits, decoded boxes
and priors per anchor or location, an optional quality logit); the task owns what follows and
runs it identically after every runtime: post-processing (threshold, top-k, per-class NMS),
the training loss (:mod:`toolchain.tasks.detection_loss`), and scoring. Labels are one dict per
image (``boxes`` xyxy pixels, ``labels``, ``ignore``), batched as a list.

Scores (:mod:`toolchain.tasks.det_metrics`): COCO mAP@[.5:.95], mAP@.5 and per-class AP and
recall; under corruptions Michaelis et al. 2019's mPC (mean mAP over corruptions x severities)
and rPC (mPC / clean mAP); under attacks the mAP, the share of objects still found, and the
vanishing rate (objects found clean that the attack made disappear); per budget the per-image
worst case over the attacks. An object counts as found when a detection of its class with a
score of at least 0.3 overlaps it at IoU 0.5 (the operating point).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from toolchain.errors import UserError
from toolchain.report.schema import AttackRow, Corruptions, Evaluation, Parity, RobustMap
from toolchain.tasks.base import TASKS, AttackSpec, Evaluator, Labels, Objective, Output, Task, finite_images
from toolchain.tasks.detection_loss import detection_loss
from toolchain.tasks.detection_ops import (
    FOUND_IOU,
    MAX_DETECTIONS,
    NMS_IOU,
    OPERATING_SCORE,
    SCORE_THRESHOLD,
    Detections,
    box_iou,
    class_scores,
    found,
    match,
    postprocess,
    unpack,
)

if TYPE_CHECKING:
    from pathlib import Path

    from toolchain.recipe import ValidateConfig

__all__ = ["Detection", "DetectionEvaluator", "DetectionObjective", "detection_collate_targets"]


#: How far below the operating score the other file's detection may score and still agree.
PRECISION_SCORE_MARGIN = 0.05


def detection_collate_targets(y: Labels) -> list[dict[str, torch.Tensor]]:
    """The targets of a batch as a list (a batch of one image may come as a lone dict)."""
    return [y] if isinstance(y, dict) else list(y)


class DetectionObjective(Objective):
    """The detection loss; an image is fooled once fewer than half of its objects are found;
    every image is attacked, to its highest-loss point."""

    keep_highest_loss = True

    def loss(self, out: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        return detection_loss(out, detection_collate_targets(y), reduction)

    def divergence(self, out: Output, reference: Output, y: Labels, reduction: str = "mean") -> torch.Tensor:
        """TRADES' KL for detection (our reading): per prior and class, the KL between the
        Bernoulli class scores of the clean and the perturbed input, summed over classes;
        ``mean`` over priors and images, or ``sum``."""
        p, q = unpack(out).scores, unpack(reference).scores
        log_p, log_1p = F.logsigmoid(p), F.logsigmoid(-p)
        log_q, log_1q = F.logsigmoid(q), F.logsigmoid(-q)
        kl = log_q.exp() * (log_q - log_p) + log_1q.exp() * (log_1q - log_1p)
        per_prior = kl.sum(2)
        return per_prior.sum() if reduction == "sum" else per_prior.mean()

    def fooled(self, out: Output, y: Labels) -> torch.Tensor:
        targets = detection_collate_targets(y)
        result = []
        for detections, target in zip(postprocess(out), targets):
            hit = found(detections, target)
            if len(hit):
                result.append(bool(hit.float().mean() < 0.5))
            else:  # no object to lose: fooled by a confident false detection
                result.append(len(detections.confident().boxes) > 0)
        return torch.tensor(result, dtype=torch.bool)

    def attackable(self, out: Output, y: Labels) -> torch.Tensor:
        return torch.ones(len(detection_collate_targets(y)), dtype=torch.bool)

    def hits(self, out: Output, y: Labels) -> tuple[int, int]:
        hit = [found(d, t) for d, t in zip(postprocess(out), detection_collate_targets(y))]
        return int(sum(int(h.sum()) for h in hit)), int(sum(len(h) for h in hit))

    def margin(self, out: Output, y: Labels) -> torch.Tensor:
        """Per image, how far the objects are from vanishing: the summed excess over the
        operating score of each object's best-overlapping score of its class (0 once every
        object is lost: Square on a detection objective)."""
        from toolchain.tasks.detection_ops import box_iou

        heads = unpack(out)
        scores = class_scores(heads)
        margins = []
        for i, target in enumerate(detection_collate_targets(y)):
            keep = ~target["ignore"].bool()
            boxes, labels = target["boxes"][keep], target["labels"][keep]
            if len(boxes) == 0:
                margins.append(torch.zeros(()))
                continue
            overlap = box_iou(boxes, heads.boxes[i].float()) >= 0.5  # (g, A)
            per_class = scores[i][:, labels].T  # (g, A)
            best = torch.where(overlap, per_class, torch.zeros_like(per_class)).amax(1)
            margins.append((best - OPERATING_SCORE).clamp_min(0).sum())
        return torch.stack(margins)


class DetectionEvaluator(Evaluator):
    """Every image's detections per condition (clean, each attack, each corruption and
    severity; at most 100 per image), the objects each finds, and detection parity."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names)
        self.targets: list[dict[str, torch.Tensor]] = []
        self.detections: dict[str, list[Detections]] = defaultdict(list)
        self.reference: list[Detections] = []
        self._batch: list[Detections] = []
        self._found: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._max_abs_diff = 0.0
        self._agree = self._compared = self._ties = self._parity_nonfinite = 0

    def clean(self, out: Output, y: Labels) -> None:
        self.observe(out)
        targets = detection_collate_targets(y)
        self._batch = postprocess(out)
        self.targets.extend(targets)
        self.detections["clean"].extend(self._batch)
        self._found["clean"].extend(found(d, t) for d, t in zip(self._batch, targets))

    def compare(self, out: Output, reference: Output) -> None:
        finite = finite_images(out) & finite_images(reference)
        self._parity_nonfinite += int((~finite).sum())
        for a, b in zip(out, reference):
            if finite.any():
                self._max_abs_diff = max(self._max_abs_diff, float((a[finite] - b[finite]).abs().max()))
        ref = postprocess(reference)
        self.reference.extend(ref)
        for r, c in zip(ref, self._batch):
            agree, compared, ties = match(r, c)
            self._agree += agree
            self._compared += compared
            self._ties += ties

    def attacked(
        self, spec: AttackSpec, out: Output, y: Labels, crafted_on: torch.Tensor | None, queries: int
    ) -> None:
        self.observe(out)
        detections = postprocess(out)
        self.detections[spec.key].extend(detections)
        self._found[spec.key].extend(found(d, t) for d, t in zip(detections, detection_collate_targets(y)))

    def corrupted(self, key: str, out: Output, y: Labels) -> None:
        self.observe(out)
        detections = postprocess(out)
        self.detections[key].extend(detections)
        self._found[key].extend(found(d, t) for d, t in zip(detections, detection_collate_targets(y)))

    def survived(self, key: str) -> torch.Tensor | None:
        """Per attacked image: every object found clean is still found."""
        attacked = self._found.get(key, [])
        clean = self._found["clean"][: len(attacked)]
        return torch.tensor([bool((a | ~c).all()) for a, c in zip(attacked, clean)], dtype=torch.bool)

    def evaluation(
        self,
        common: dict[str, Any],
        specs: Sequence[AttackSpec],
        cfg: ValidateConfig,
        *,
        is_reference: bool,
        has_reference: bool,
    ) -> Evaluation:
        clean = self._scores("clean")
        parity = None
        if has_reference:
            delta = None
            if self.reference:
                delta = clean.map - self._coco(self.reference, self.targets).map
            parity = Parity(
                reference="torch",
                max_abs_diff=None if self._parity_nonfinite else self._max_abs_diff,
                top1_agreement=self._agree / self._compared if self._compared else 1.0,
                compared=self._compared,
                nonfinite=self._parity_nonfinite,
                ties=self._ties,
                map_delta=delta,
            )
        attacks = [self._attack_row(s, is_reference) for s in specs if s.key in self.detections]
        return Evaluation(
            **common,
            samples=len(self.targets),
            task=Detection.name,
            clean_accuracy=self._share_found("clean"),
            map=clean.map,
            map50=clean.map50,
            map75=clean.map75,
            per_class_ap=clean.per_class_ap,
            per_class_recall=clean.per_class_recall,
            corruptions=self._corruptions(cfg, clean.map),
            attacks=attacks,
            robust_map=self._robust_map(specs),
            parity=parity,
            nonfinite_logits=self.nonfinite,
        )

    # --- scores ------------------------------------------------------------------------------

    def _coco(self, detections: Sequence[Detections], targets: Sequence[dict[str, torch.Tensor]]) -> Any:
        from toolchain.tasks.det_metrics import coco_scores

        return coco_scores([d.as_dict() for d in detections], list(targets), self.class_names)

    def _scores(self, key: str) -> Any:
        detections = self.detections[key]
        return self._coco(detections, self.targets[: len(detections)])

    def _share_found(self, key: str) -> float:
        hits = torch.cat(self._found[key]) if self._found[key] else torch.zeros(0, dtype=torch.bool)
        return int(hits.sum()) / len(hits) if len(hits) else 0.0

    def _attack_row(self, spec: AttackSpec, is_reference: bool) -> AttackRow:
        attacked = self._scores(spec.key)
        n = len(self.detections[spec.key])
        clean = self._coco(self.detections["clean"][:n], self.targets[:n])
        before = torch.cat(self._found["clean"][:n]) if n else torch.zeros(0, dtype=torch.bool)
        after = torch.cat(self._found[spec.key]) if n else torch.zeros(0, dtype=torch.bool)
        vanished = int((before & ~after).sum()) / int(before.sum()) if int(before.sum()) else 0.0
        return AttackRow(
            name=spec.name,
            mode=spec.mode_on(is_reference),  # type: ignore[arg-type]
            norm=spec.norm,
            eps=spec.eps,
            steps=spec.steps if spec.mode == "white-box" else 0,
            samples=n,
            accuracy=self._share_found(spec.key),
            ensemble=spec.ensemble,
            map=attacked.map,
            map50=attacked.map50,
            clean_map=clean.map,
            vanishing_rate=vanished,
        )

    def _robust_map(self, specs: Sequence[AttackSpec]) -> list[RobustMap]:
        budgets: dict[tuple[str, float], list[AttackSpec]] = defaultdict(list)
        for spec in specs:
            if spec.key in self.detections:
                budgets[(spec.norm, spec.eps)].append(spec)
        entries = []
        for (norm, eps), group in budgets.items():
            n = min(len(self.detections[s.key]) for s in group)
            worst = []
            for i in range(n):
                # The attack that leaves this image the fewest objects (the first on a tie).
                left = [int(self._found[s.key][i].sum()) for s in group]
                worst.append(self.detections[group[left.index(min(left))].key][i])
            scores = self._coco(worst, self.targets[:n])
            entries.append(
                RobustMap(
                    norm=norm,
                    eps=eps,
                    map=scores.map,
                    map50=scores.map50,
                    samples=n,
                    attacks=[s.name for s in group],
                )
            )
        return entries

    def _corruptions(self, cfg: ValidateConfig, clean_map: float) -> Corruptions:
        names, severities = list(cfg.corruptions.names), list(cfg.corruptions.severities)
        if not names:
            return Corruptions()
        per_map = {c: {str(s): self._scores(f"{c}:{s}").map for s in severities} for c in names}
        per_found = {c: {str(s): self._share_found(f"{c}:{s}") for s in severities} for c in names}
        values = [v for by in per_map.values() for v in by.values()]
        found_values = [v for by in per_found.values() for v in by.values()]
        mpc = sum(values) / len(values)
        return Corruptions(
            per_corruption=per_found,
            mean_accuracy=sum(found_values) / len(found_values),
            per_corruption_map=per_map,
            mpc=mpc,
            rpc=mpc / clean_map if clean_map > 0 else None,
        )


class Detection(Task):
    """Raw heads ``(scores, boxes, priors[, quality])``; the detection loss; COCO mAP, mPC/rPC,
    mAP under attack and the vanishing rate; mCE on mAP."""

    name = "detection"
    output = "(scores (N, A, K), boxes (N, A, 4), priors (N, A, 4)[, quality (N, A, 1)])"
    objective = DetectionObjective()
    spatial_labels = True
    post_processes = True
    post_processes_in_graph: ClassVar[bool] = True
    #: Corruptions that move content locally, which axis-aligned boxes cannot follow.
    refused_corruptions: ClassVar[dict[str, str]] = {
        "elastic_transform": "its local warp moves objects in ways an axis-aligned box cannot follow"
    }

    def post_process(self, out: Output) -> Any:
        """Threshold, top-k and per-class NMS (:func:`~toolchain.tasks.detection_ops.postprocess`)."""
        return postprocess(out)

    def model_output(self, output: Any) -> Any:
        """The raw heads, as a tuple."""
        return tuple(output) if isinstance(output, tuple | list) else output

    def output_names(self, count: int) -> list[str] | None:
        return ["scores", "boxes", "priors", "quality"][:count]

    @property
    def parity_agreement(self) -> Callable[[Output, Output], tuple[int, int]] | None:
        return _matched_detections

    def write_end_to_end(self, source: Path, target: Path) -> Callable[[Output, Any], tuple[int, int]] | None:
        from exporters.detection_graph import add_detection_postprocess

        add_detection_postprocess(
            source,
            target,
            score_threshold=SCORE_THRESHOLD,
            iou_threshold=NMS_IOU,
            max_per_class=MAX_DETECTIONS,
        )
        return _matched_in_graph

    @property
    def precision_agreement(self) -> Callable[[Output, Output], tuple[int, int]] | None:
        return _same_answers

    def evaluator(self, class_names: Sequence[str]) -> Evaluator:
        return DetectionEvaluator(class_names)

    def check_output(self, out: Any, num_classes: int, x: torch.Tensor) -> None:
        try:
            heads = unpack(out)
        except ValueError as exc:
            raise UserError(f"task detection needs {self.output}: {exc}") from None
        if heads.scores.shape[0] != x.shape[0] or heads.scores.shape[2] != num_classes:
            raise UserError(
                f"the detector returns scores {tuple(heads.scores.shape)} for a {tuple(x.shape)} batch; "
                f"task detection needs (N, A, {num_classes}): one score per class, no background column"
            )

    def corruption_scores(self, ev: Evaluation) -> tuple[dict[str, dict[str, float]] | None, float]:
        return ev.corruptions.per_corruption_map, ev.map if ev.map is not None else 0.0


TASKS.register(Detection.name)(Detection())


def in_graph_detections(out: Any, images: int) -> list[Detections]:
    """The detections of an ``export.end_to_end`` file's outputs (``det_batch``, ``det_class``,
    ``det_score``, ``det_boxes``), per image, best first."""
    batch, label, score, boxes = (torch.as_tensor(t) for t in out)
    result = []
    for i in range(images):
        mine = (batch == i).nonzero().squeeze(1)
        mine = mine[score[mine].argsort(descending=True)]
        result.append(
            Detections(boxes[mine].float(), score[mine].float(), label[mine], torch.full_like(mine, -1))
        )
    return result


def _matched_in_graph(raw: Output, in_graph: Any) -> tuple[int, int]:
    """Confident detections (score >= the operating score) matched between the host's
    post-processing of the raw outputs and an end-to-end file's; only the confident ones count,
    since the two cap differently (the host keeps 100 per image, the graph 100 per class)."""
    host = postprocess(raw)
    graph = in_graph_detections(in_graph, len(host))
    agree = compared = 0
    for r, c in zip(host, graph):
        a, n, _ = match(r.confident(), c.confident())
        agree, compared = agree + a, compared + n
    return agree, compared


def _matched_detections(reference: Output, candidate: Output) -> tuple[int, int]:
    """Detections matched across two runtimes (:func:`~toolchain.tasks.detection_ops.match`)."""
    agree = compared = 0
    for r, c in zip(postprocess(reference), postprocess(candidate)):
        a, n, _ = match(r, c)
        agree, compared = agree + a, compared + n
    return agree, compared


def _same_answers(reference: Output, candidate: Output) -> tuple[int, int]:
    """What an INT8 file is held to against its FP32 file: the same confident detections. Each
    confident detection of either file is one unit; it agrees when the other file has a
    detection of its class at IoU >= 0.5 (one to one, best score first) scoring at least
    :data:`PRECISION_SCORE_MARGIN` below the operating score, so a detection that merely crosses
    the operating point by rounding is not a disagreement. Quantisation moves boxes and scores by
    more than the export parity's IoU 0.99 and 1e-3, so this judges the answer a deployment acts
    on instead."""
    agree = compared = 0
    floor = OPERATING_SCORE - PRECISION_SCORE_MARGIN
    for r, c in zip(postprocess(reference), postprocess(candidate), strict=True):
        for mine, theirs in ((r.confident(), c.confident(floor)), (c.confident(), r.confident(floor))):
            agree += _found_in(mine, theirs)
            compared += len(mine.boxes)
    return agree, compared


def _found_in(mine: Detections, theirs: Detections) -> int:
    """How many of ``mine`` (best first) find a detection of their class at IoU >= 0.5 among
    ``theirs``, each of ``theirs`` found once."""
    if len(mine.boxes) == 0 or len(theirs.boxes) == 0:
        return 0
    overlap = box_iou(mine.boxes, theirs.boxes)
    taken = torch.zeros(len(theirs.boxes), dtype=torch.bool)
    hits = 0
    for i in torch.argsort(mine.scores, descending=True).tolist():
        ok = (theirs.labels == mine.labels[i]) & (overlap[i] >= FOUND_IOU) & ~taken
        if ok.any():
            taken[int(ok.nonzero()[0])] = True
            hits += 1
    return hits
