"""An end-to-end detection ONNX file: the exported raw heads followed by post-processing in the
graph, with ONNX's ``NonMaxSuppression`` (TensorRT 10 runs it as its own NMS layer).

The raw-heads file (class logits ``scores`` ``(N, A, K)``, decoded ``boxes`` ``(N, A, 4)``,
``priors``, optional ``quality`` ``(N, A, 1)``) is what robustprune validates, since the task
post-processes identically after every runtime. A deployment that wants the detections out of
the engine itself takes this file instead: ``score = sigmoid(class)`` (times
``sigmoid(quality)``, square-rooted, where there is a quality head), per-class NMS at
``iou_threshold`` over the scores above ``score_threshold``, at most ``max_per_class``
detections per class and image. Outputs, one row per detection: ``det_batch`` (int64 image
index), ``det_class`` (int64), ``det_score`` ``(M,)`` and ``det_boxes`` ``(M, 4)`` xyxy pixels.

It differs from the task's host post-processing (:mod:`toolchain.tasks.detection_ops`) in the
caps only: ONNX's operator caps detections per class, the host keeps the best 1,000 candidates
before NMS and 100 detections per image after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.errors import ExportError
from exporters.onnx import _write_checked, load_onnx

__all__ = ["add_detection_postprocess"]

OUTPUTS = ("det_batch", "det_class", "det_score", "det_boxes")


def _i64(value: int | list[int]) -> np.ndarray:
    return np.array(value, dtype=np.int64)


def add_detection_postprocess(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.6,
    max_per_class: int = 100,
) -> Path:
    """Write ``target``: ``source``'s raw heads followed by post-processing (module docstring).

    Raises:
        ExportError: ``source`` does not have outputs ``scores`` and ``boxes`` (and optionally
            ``quality``), or the result fails the ONNX checker.
    """
    proto = load_onnx(source)
    graph = proto.graph
    names = [o.name for o in graph.output]
    if "scores" not in names or "boxes" not in names:
        raise ExportError(f"{source}: expected a detector's raw outputs scores and boxes, got {names}")
    prefix = "postprocess/"

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, prefix + name))
        return prefix + name

    nodes = [helper.make_node("Sigmoid", ["scores"], [prefix + "class_prob"])]
    score = prefix + "class_prob"
    if "quality" in names:
        nodes += [
            helper.make_node("Sigmoid", ["quality"], [prefix + "quality_prob"]),
            helper.make_node("Mul", [score, prefix + "quality_prob"], [prefix + "joint"]),
            helper.make_node("Sqrt", [prefix + "joint"], [prefix + "score"]),
        ]
        score = prefix + "score"
    nodes += [
        helper.make_node("Transpose", [score], [prefix + "per_class"], perm=[0, 2, 1]),
        helper.make_node(
            "NonMaxSuppression",
            [
                "boxes",
                prefix + "per_class",
                const("max_per_class", np.array([max_per_class], dtype=np.int64)),
                const("iou", np.array([iou_threshold], dtype=np.float32)),
                const("score_threshold", np.array([score_threshold], dtype=np.float32)),
            ],
            [prefix + "selected"],
        ),
        # selected: (M, 3) = (image, class, box)
        helper.make_node(
            "Gather", [prefix + "selected", const("col0", np.array(0, dtype=np.int64))], ["det_batch"], axis=1
        ),
        helper.make_node(
            "Gather", [prefix + "selected", const("col1", np.array(1, dtype=np.int64))], ["det_class"], axis=1
        ),
        helper.make_node("GatherND", [prefix + "per_class", prefix + "selected"], ["det_score"]),
        helper.make_node(
            "Gather",
            [prefix + "selected", const("cols02", np.array([0, 2], dtype=np.int64))],
            [prefix + "image_box"],
            axis=1,
        ),
        helper.make_node("GatherND", ["boxes", prefix + "image_box"], ["det_boxes"]),
    ]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("det_batch", TensorProto.INT64, ["detections"]),
            helper.make_tensor_value_info("det_class", TensorProto.INT64, ["detections"]),
            helper.make_tensor_value_info("det_score", TensorProto.FLOAT, ["detections"]),
            helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, ["detections", 4]),
        ]
    )
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        output_names='["det_batch", "det_class", "det_score", "det_boxes"]',
        postprocess=f"sigmoid, NMS per class: score > {score_threshold}, IoU {iou_threshold}, "
        f"at most {max_per_class} per class",
    )
    onnx.helper.set_model_props(proto, props)
    target = Path(target)
    _write_checked(proto, target)
    return target
