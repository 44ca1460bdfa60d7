"""Hungarian matching of predicted boxes to ground truth (DETR / Deformable DETR set prediction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import convert_boxes, generalized_box_iou
from .registry import MODELS

__all__ = ["HungarianMatcher", "check_match_inputs"]


def check_match_inputs(
    pred_logits: Tensor,
    pred_boxes_cxcywh: Tensor,
    targets: list[Tensor],
    target_labels: list[Tensor] | None,
) -> list[Tensor]:
    """Validates matcher / criterion inputs and returns the per-image target labels.

    Args:
        pred_logits: (B, N, C) class logits.
        pred_boxes_cxcywh: (B, N, 4) predicted boxes, normalised cxcywh.
        targets: B tensors (M_i, 4) of target boxes, normalised cxcywh.
        target_labels: B int tensors (M_i,) in [0, C), or None for class-agnostic targets.

    Returns:
        B int64 tensors (M_i,): ``target_labels``, or zeros (label 0) when it is None.
    """
    if pred_logits.ndim != 3 or pred_boxes_cxcywh.ndim != 3 or pred_boxes_cxcywh.shape[-1] != 4:
        raise ValueError(
            f"expected pred_logits (B, N, C) and pred_boxes_cxcywh (B, N, 4), got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_boxes_cxcywh.shape)}"
        )
    if pred_logits.shape[:2] != pred_boxes_cxcywh.shape[:2]:
        raise ValueError(
            f"pred_logits {tuple(pred_logits.shape)} and pred_boxes_cxcywh "
            f"{tuple(pred_boxes_cxcywh.shape)} disagree on (B, N)"
        )
    batch_size, num_classes = pred_logits.shape[0], pred_logits.shape[-1]
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target tensors for a batch of {batch_size}")
    for i, boxes in enumerate(targets):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}] must be (M, 4) cxcywh, got {tuple(boxes.shape)}")
    if target_labels is None:
        return [torch.zeros(len(t), dtype=torch.long, device=t.device) for t in targets]
    if len(target_labels) != batch_size:
        raise ValueError(f"got {len(target_labels)} label tensors for a batch of {batch_size}")
    for i, (labels, boxes) in enumerate(zip(target_labels, targets, strict=True)):
        if labels.shape != (len(boxes),):
            raise ValueError(
                f"target_labels[{i}] has shape {tuple(labels.shape)}, want ({len(boxes)},)"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"target_labels[{i}] must lie in [0, {num_classes}), got {labels.tolist()}"
            )
    return [labels.long() for labels in target_labels]


@MODELS.register_module()
class HungarianMatcher:
    """One-to-one assignment of predictions to targets minimising a weighted matching cost.

    The cost of prediction ``n`` for target ``m`` with label ``c`` is
    ``cost_class * focal(n, c) + cost_bbox * |b_n - b_m|_1 - cost_giou * GIoU(b_n, b_m)``, where
    ``focal`` is the Deformable DETR class cost (Zhu et al. 2021): the focal loss of predicting
    ``c`` minus the focal loss of predicting "not ``c``". L1 is on normalised cxcywh, GIoU on xyxy.

    Args:
        cost_class: Weight of the focal class cost. Defaults to 2.0.
        cost_bbox: Weight of the L1 box cost. Defaults to 5.0.
        cost_giou: Weight of the (negative) GIoU cost. Defaults to 2.0.
        focal_alpha: Focal-loss alpha of the class cost. Defaults to 0.25.
        focal_gamma: Focal-loss gamma of the class cost. Defaults to 2.0.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                "matching costs must be non-negative and not all zero, got "
                f"cost_class={cost_class}, cost_bbox={cost_bbox}, cost_giou={cost_giou}"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma})"
        )

    @torch.no_grad()
    def __call__(
        self,
        pred_logits: Tensor,
        pred_boxes_cxcywh: Tensor,
        targets: list[Tensor],
        target_labels: list[Tensor] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Matches each image's predictions to its targets.

        Args:
            pred_logits: (B, N, C) class logits (C = 1 for class-agnostic objectness).
            pred_boxes_cxcywh: (B, N, 4) predicted boxes, normalised cxcywh.
            targets: B tensors (M_i, 4) of target boxes, normalised cxcywh; M_i may be 0.
            target_labels: B int tensors (M_i,) of labels in [0, C). Defaults to label 0.

        Returns:
            Per image, ``(pred_idx, target_idx)``: int64 CPU tensors of length min(N, M_i);
            prediction ``pred_idx[k]`` is matched to target ``target_idx[k]``.

        Raises:
            FloatingPointError: if a cost is NaN or infinite (non-finite logits or boxes, or
                degenerate boxes whose GIoU is undefined).
        """
        labels = check_match_inputs(pred_logits, pred_boxes_cxcywh, targets, target_labels)
        costs = [
            self.cost_matrix(logits, boxes, target, labels_i)
            for logits, boxes, target, labels_i in zip(
                pred_logits, pred_boxes_cxcywh, targets, labels, strict=True
            )
        ]
        # One device -> host copy for the batch (not one sync per image).
        flat = torch.cat([cost.flatten() for cost in costs]).cpu()
        indices = []
        for i, cost in enumerate(flat.split([c.numel() for c in costs])):
            if not bool(torch.isfinite(cost).all()):
                raise FloatingPointError(
                    _non_finite_message(i, pred_logits[i], pred_boxes_cxcywh[i], targets[i])
                )
            # An (N, 0) cost (image without objects) gives empty index arrays.
            pred_idx, target_idx = linear_sum_assignment(cost.view(costs[i].shape).numpy())
            indices.append(
                (
                    torch.as_tensor(pred_idx, dtype=torch.long),
                    torch.as_tensor(target_idx, dtype=torch.long),
                )
            )
        return indices

    def cost_matrix(
        self, logits: Tensor, boxes_cxcywh: Tensor, target_cxcywh: Tensor, target_labels: Tensor
    ) -> Tensor:
        """Matching cost of one image.

        Args:
            logits: (N, C) class logits.
            boxes_cxcywh: (N, 4) predicted boxes, normalised cxcywh.
            target_cxcywh: (M, 4) target boxes, normalised cxcywh.
            target_labels: (M,) int64 target labels.

        Returns:
            (N, M) cost; lower is a better match.
        """
        logits = logits.float()[:, target_labels]  # (N, M): logit of each target's class
        # focal(positive) - focal(negative), with log-sigmoid for stability instead of log(p + eps)
        prob = logits.sigmoid()
        pos = self.focal_alpha * (1 - prob) ** self.focal_gamma * -F.logsigmoid(logits)
        neg = (1 - self.focal_alpha) * prob**self.focal_gamma * -F.logsigmoid(-logits)
        boxes_cxcywh, target_cxcywh = boxes_cxcywh.float(), target_cxcywh.float()
        cost_bbox = torch.cdist(boxes_cxcywh, target_cxcywh, p=1)
        giou = generalized_box_iou(
            convert_boxes(boxes_cxcywh, src="norm_cxcywh", dst="norm_xyxy"),
            convert_boxes(target_cxcywh, src="norm_cxcywh", dst="norm_xyxy"),
        )
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox - self.cost_giou * giou


def _non_finite_message(index: int, logits: Tensor, boxes: Tensor, targets: Tensor) -> str:
    culprits = [
        name
        for name, value in (
            ("pred_logits", logits),
            ("pred_boxes_cxcywh", boxes),
            ("targets", targets),
        )
        if not bool(torch.isfinite(value).all())
    ]
    reason = (
        f"non-finite values in {', '.join(culprits)}"
        if culprits
        else "degenerate boxes (zero-area enclosing box makes GIoU undefined)"
    )
    return f"HungarianMatcher: the matching cost of image {index} is NaN or infinite: {reason}"
