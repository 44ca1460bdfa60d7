"""Set-prediction criterion of DETR-style proposers: Hungarian matching, then focal, L1 and GIoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import convert_boxes, generalized_box_iou
from .matching import HungarianMatcher, check_match_inputs
from .registry import MODELS

__all__ = ["SetCriterion"]

LOSS_NAMES = ("loss_focal", "loss_l1", "loss_giou")


@MODELS.register_module()
class SetCriterion(nn.Module):
    """Deformable DETR losses for (class-agnostic) box sets, each normalised by the box count.

    With K matched pairs and ``num_boxes`` target boxes (clamped to >= 1):

    - ``loss_focal``: sigmoid focal loss summed over all B * N * C logits (matched predictions
      have target 1 for their label, all others 0) / num_boxes;
    - ``loss_l1``: L1 between matched predicted and target cxcywh boxes, summed / num_boxes;
    - ``loss_giou``: sum of ``1 - GIoU`` over matched pairs (xyxy) / num_boxes;

    each multiplied by its weight in ``loss_weights``. Aux losses of intermediate decoder layers
    are the caller's: call the criterion per layer and suffix the keys.

    Args:
        matcher: ``HungarianMatcher`` config (``type="HungarianMatcher"``, built with ``MODELS``)
            or a built matcher.
        loss_weights: Weight per loss name. Defaults to
            ``dict(loss_focal=2.0, loss_l1=5.0, loss_giou=2.0)``.
        focal_alpha: Focal-loss alpha. Defaults to 0.25.
        focal_gamma: Focal-loss gamma. Defaults to 2.0.
    """

    def __init__(
        self,
        *,
        matcher: dict | HungarianMatcher,
        loss_weights: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.matcher = MODELS.build(matcher) if isinstance(matcher, dict) else matcher
        if loss_weights is None:
            loss_weights = dict(loss_focal=2.0, loss_l1=5.0, loss_giou=2.0)
        unknown = sorted(set(loss_weights) - set(LOSS_NAMES))
        missing = sorted(set(LOSS_NAMES) - set(loss_weights))
        if unknown or missing:
            raise ValueError(
                f"loss_weights must name exactly {LOSS_NAMES}; unknown {unknown}, missing {missing}"
            )
        self.loss_weights = {name: float(loss_weights[name]) for name in LOSS_NAMES}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self,
        pred_logits: Tensor,
        pred_boxes_cxcywh: Tensor,
        targets: list[Tensor],
        target_labels: list[Tensor] | None = None,
        *,
        num_boxes: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Matches predictions to targets and computes the weighted losses.

        Args:
            pred_logits: (B, N, C) logits; C = 1 for class-agnostic objectness.
            pred_boxes_cxcywh: (B, N, 4) predicted boxes, normalised cxcywh.
            targets: B tensors (M_i, 4) of target boxes, normalised cxcywh; M_i may be 0.
            target_labels: B int tensors (M_i,) in [0, C). Defaults to label 0 (class-agnostic).
            num_boxes: Normaliser override. Distributed callers pass the all-reduced target count
                divided by the world size (DETR's convention). Defaults to the local count.
                Clamped to >= 1 either way.

        Returns:
            ``{"loss_focal", "loss_l1", "loss_giou"}``: weighted scalar losses.
        """
        labels = check_match_inputs(pred_logits, pred_boxes_cxcywh, targets, target_labels)
        indices = self.matcher(pred_logits, pred_boxes_cxcywh, targets, labels)
        normaliser = self._normaliser(targets, num_boxes, pred_logits)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        pred_idx = torch.cat([src for src, _ in indices]).to(pred_logits.device)
        batch_idx = batch_idx.to(pred_logits.device)
        matched_labels = torch.cat(
            [lab[tgt.to(lab.device)] for lab, (_, tgt) in zip(labels, indices, strict=True)]
        ).to(pred_logits.device)
        losses = {
            "loss_focal": self.loss_focal(pred_logits, batch_idx, pred_idx, matched_labels),
            **self.loss_boxes(pred_boxes_cxcywh, targets, indices),
        }
        return {name: self.loss_weights[name] * losses[name] / normaliser for name in LOSS_NAMES}

    def loss_focal(
        self, pred_logits: Tensor, batch_idx: Tensor, pred_idx: Tensor, matched_labels: Tensor
    ) -> Tensor:
        """Unnormalised focal loss summed over all logits.

        Args:
            pred_logits: (B, N, C) logits.
            batch_idx: (K,) image index of each matched prediction.
            pred_idx: (K,) query index of each matched prediction.
            matched_labels: (K,) label of the target each prediction is matched to.

        Returns:
            Scalar sum. Unmatched predictions (all of them in images without objects) have
            target 0, so the loss pushes their scores down.
        """
        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx, pred_idx, matched_labels] = 1.0
        return sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )

    def loss_boxes(
        self,
        pred_boxes_cxcywh: Tensor,
        targets: list[Tensor],
        indices: list[tuple[Tensor, Tensor]],
    ) -> dict[str, Tensor]:
        """Unnormalised L1 (cxcywh) and ``1 - GIoU`` (xyxy) sums over matched pairs.

        Args:
            pred_boxes_cxcywh: (B, N, 4) predicted boxes.
            targets: B tensors (M_i, 4) of target boxes, cxcywh.
            indices: Matcher output, one ``(pred_idx, target_idx)`` per image.

        Returns:
            ``{"loss_l1", "loss_giou"}`` scalar sums.
        """
        # A batch without any target box still returns losses connected to pred_boxes_cxcywh
        # (value 0, gradient 0): DDP with find_unused_parameters=False expects a gradient for
        # every parameter on every rank, including the box-regression head.
        zero = pred_boxes_cxcywh.sum() * 0.0
        loss_l1, loss_giou = zero, zero
        for boxes, target, (pred_idx, target_idx) in zip(
            pred_boxes_cxcywh, targets, indices, strict=True
        ):
            if len(pred_idx) == 0:
                continue
            src = boxes[pred_idx.to(boxes.device)]
            tgt = target[target_idx.to(target.device)].to(src)
            loss_l1 = loss_l1 + F.l1_loss(src, tgt, reduction="sum")
            # Per image, so the (K_i, K_i) pairwise GIoU stays small; its diagonal = matched pairs.
            giou = generalized_box_iou(
                convert_boxes(src, src="norm_cxcywh", dst="norm_xyxy"),
                convert_boxes(tgt, src="norm_cxcywh", dst="norm_xyxy"),
            )
            loss_giou = loss_giou + (1.0 - torch.diagonal(giou)).sum()
        return {"loss_l1": loss_l1, "loss_giou": loss_giou}

    @staticmethod
    def _normaliser(
        targets: list[Tensor], num_boxes: float | Tensor | None, like: Tensor
    ) -> Tensor:
        if num_boxes is None:
            num_boxes = float(sum(len(t) for t in targets))
        value = torch.as_tensor(num_boxes, dtype=torch.float32, device=like.device)
        return value.detach().clamp(min=1.0)
