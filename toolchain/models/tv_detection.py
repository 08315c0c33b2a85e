"""torchvision's single-stage detectors as raw heads in the detection task's contract.

torchvision's detection models resize and normalise inside ``forward`` and post-process there
(score threshold, NMS), which a deployed engine must not contain and the task must run itself.
:class:`RawHeads` keeps their backbone, head, anchor generator and box coder, skips the
transform (robustprune normalises inside its wrapper and feeds the recipe's size) and returns
``(class logits, boxes, anchors[, centerness])`` (:mod:`toolchain.tasks.detection_ops`):

* ``retinanet_resnet50_fpn(_v2)``: sigmoid class logits, ``BoxCoder`` deltas decoded on the
  anchors;
* ``fcos_resnet50_fpn``: sigmoid class logits, ``BoxLinearCoder`` distances, and centerness;
* ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large``: softmax logits with a background
  class, turned into one independent logit per class, ``log(p_c / (1 - p_c))`` (so the task's
  sigmoid scores equal SSD's softmax probabilities), deltas decoded on the default boxes.

Two-stage detectors (Faster/Mask/Keypoint R-CNN) cannot go through: their second stage pools
features of proposals chosen by an NMS inside the network, so there is no fixed set of raw
outputs to export and post-process afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toolchain.errors import UserError

#: torchvision detection models that cannot go through, and why.
TWO_STAGE_REASON = (
    "a two-stage detector: its second stage pools features of proposals chosen by an NMS inside "
    "the network, so there is no fixed set of raw outputs to export and post-process after the "
    "engine; use a single-stage detector (ssdlite320_mobilenet_v3_large, retinanet_resnet50_fpn_v2, "
    "fcos_resnet50_fpn) or detnet"
)
SINGLE_STAGE = ("ssd", "retinanet", "fcos")


def build(name: str, num_classes: int) -> nn.Module:
    """torchvision's ``name`` built without any weights, as :class:`RawHeads`.

    Raises:
        UserError: a two-stage detector (see :data:`TWO_STAGE_REASON`).
    """
    import torchvision.models

    if not name.startswith(SINGLE_STAGE):
        raise UserError(f"torchvision:{name} cannot go through robustprune: {TWO_STAGE_REASON}")
    background = name.startswith("ssd")  # SSD counts a background class, the others do not
    model = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=num_classes + int(background)
    )
    return RawHeads(model, softmax_background=background, centerness=name.startswith("fcos"))


def independent_logits(logits: torch.Tensor) -> torch.Tensor:
    """Softmax logits ``(..., K + 1)`` with the background first, as one logit per class
    ``(..., K)``: ``log(p_c / (1 - p_c))`` = ``z_c - logsumexp(z_{j != c})``."""
    k = logits.shape[-1]
    index = torch.arange(k, device=logits.device)
    mask = index.unsqueeze(0) == index.unsqueeze(1)  # the identity (torch.eye exports an EyeLike
    # that ONNX Runtime does not run)
    others = logits.unsqueeze(-2).masked_fill(mask, float("-inf"))  # (..., K+1, K+1): row c without c
    odds = logits - torch.logsumexp(others, dim=-1)
    return odds[..., 1:]


class RawHeads(nn.Module):
    """A torchvision single-stage detector's backbone and head, returning raw heads."""

    def __init__(self, model: nn.Module, *, softmax_background: bool, centerness: bool) -> None:
        super().__init__()
        self.backbone: Any = model.backbone
        self.head: Any = model.head
        self.anchor_generator: Any = model.anchor_generator
        self.box_coder: Any = model.box_coder
        self.softmax_background = softmax_background
        self.centerness = centerness

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torchvision.models.detection.image_list import ImageList

        features = self.backbone(x)
        levels = list(features.values()) if isinstance(features, dict) else [features]
        heads: dict[str, Any] = self.head(levels)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        # Every image has the same anchors: made for one and expanded, so that nothing in the
        # graph depends on the batch size as a Python number (the ONNX batch stays dynamic).
        one = self.anchor_generator(ImageList(x[:1], [size]), [level[:1] for level in levels])[0]
        anchors = one.unsqueeze(0).expand(x.shape[0], -1, -1)
        codes, flat = heads["bbox_regression"].reshape(-1, 4), anchors.reshape(-1, 4)
        # BoxCoder (RetinaNet, SSD) decodes with decode_single, BoxLinearCoder (FCOS) with decode.
        decode = getattr(self.box_coder, "decode_single", None) or self.box_coder.decode
        boxes = decode(codes, flat)
        limit = torch.tensor([size[1], size[0], size[1], size[0]], dtype=x.dtype, device=x.device)
        boxes = torch.minimum(boxes.reshape(anchors.shape).clamp_min(0), limit)
        logits = heads["cls_logits"]
        if self.softmax_background:
            logits = independent_logits(logits)
        out = (logits, boxes, anchors)
        return (*out, heads["bbox_ctrness"]) if self.centerness else out
