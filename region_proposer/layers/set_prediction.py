"""Set-prediction outputs shared by the DETR-style proposers: box refinement, targets from
``instances``, per-source objectness in the loss, auxiliary-layer losses, and ``Proposals``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ..box_ops import convert_boxes
from ..heads import ObjectnessHeads
from ..structures import Proposals

__all__ = [
    "LayerPrediction",
    "inverse_sigmoid",
    "prediction_losses",
    "proposals_from_prediction",
    "refine_boxes",
]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=eps, max=1.0 - eps)
    return torch.log(x / (1.0 - x))


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Deformable DETR box update: ``sigmoid(delta + logit(reference))``.

    Args:
        delta: (B, N, 4) predicted (cx, cy, w, h) deltas in logit space.
        reference: (B, N, 4) boxes or (B, N, 2) points (then w, h come from ``delta`` alone).

    Returns:
        (B, N, 4) cxcywh boxes in (0, 1).
    """
    if reference.shape[-1] == 2:
        return torch.cat(
            [delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1
        ).sigmoid()
    return (delta + inverse_sigmoid(reference)).sigmoid()


@dataclass(frozen=True)
class LayerPrediction:
    """One set of predictions: a decoder layer's, or the two-stage encoder proposals.

    Attributes:
        logits: Source name -> (B, N, 1) objectness logits.
        boxes_cxcywh: (B, N, 4) boxes, normalised cxcywh of the unpadded image.
        heads: The ``ObjectnessHeads`` that produced ``logits`` (picks and fuses sources).
    """

    logits: dict[str, Tensor]
    boxes_cxcywh: Tensor
    heads: ObjectnessHeads


def _targets(instances: list[InstanceData], like: Tensor) -> list[Tensor]:
    """Per image (M_i, 4) normalised cxcywh targets from ``instances[i].bboxes`` (xyxy)."""
    targets = []
    for i, inst in enumerate(instances):
        if "bboxes" not in inst:
            raise KeyError(f"instances[{i}] has no 'bboxes' (normalised xyxy ground truth)")
        boxes = torch.as_tensor(inst.bboxes).to(device=like.device, dtype=like.dtype)
        if boxes.numel() == 0:  # images without objects may carry (0,) or (0, 4)
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"instances[{i}].bboxes must be (M, 4), got {tuple(boxes.shape)}")
        targets.append(convert_boxes(boxes, src="norm_xyxy", dst="norm_cxcywh"))
    return targets


def _unused_heads_anchor(prediction: LayerPrediction, used: set[str]) -> Tensor:
    """0 * the logits of heads no image in the batch trains, so those heads still get a (zero)
    gradient: DDP with ``find_unused_parameters=False`` expects one for every parameter."""
    zero = prediction.boxes_cxcywh.new_zeros(())
    for name, logits in prediction.logits.items():
        if name not in used:
            zero = zero + 0.0 * logits.sum()
    return zero


def prediction_losses(
    criterion: nn.Module,
    predictions: Mapping[str, LayerPrediction],
    instances: list[InstanceData],
) -> dict[str, Tensor]:
    """Runs the criterion on every prediction set and prefixes the loss names.

    Args:
        criterion: ``SetCriterion``: ``(logits (B,N,1), boxes_cxcywh (B,N,4), targets) -> dict``.
        predictions: Key prefix -> prediction; ``""`` for the final layer, ``"d{i}."`` for
            auxiliary decoder layers, ``"enc."`` for two-stage encoder proposals.
        instances: One ``InstanceData`` per image with ``bboxes`` (M, 4) normalised xyxy of the
            unpadded image (M may be 0) and optionally metainfo ``source``.

    Returns:
        Prefixed loss name -> scalar, e.g. ``loss_focal``, ``d0.loss_giou``, ``enc.loss_l1``.
    """
    first = next(iter(predictions.values()))
    if len(instances) != first.boxes_cxcywh.shape[0]:
        raise ValueError(
            f"got {len(instances)} instances for a batch of {first.boxes_cxcywh.shape[0]}"
        )
    targets = _targets(instances, first.boxes_cxcywh)
    sources = [inst.metainfo.get("source") for inst in instances]
    losses: dict[str, Tensor] = {}
    for prefix, pred in predictions.items():
        used = {pred.heads.head_for(source) for source in sources}
        logits = pred.heads.select(pred.logits, sources)
        for name, value in criterion(logits, pred.boxes_cxcywh, targets).items():
            losses[prefix + name] = value
        losses[prefix + "loss_focal"] = losses[prefix + "loss_focal"] + _unused_heads_anchor(
            pred, used
        )
    return losses


def proposals_from_prediction(
    prediction: LayerPrediction, embeddings: Tensor, valid: Tensor | None = None
) -> Proposals:
    """``Proposals`` from the final prediction set.

    Args:
        prediction: Final-layer prediction (boxes in the unpadded image's normalised frame).
        embeddings: (B, N, D) final query features.
        valid: (B, N) bool; False marks queries without a real source. Defaults to all True.

    Returns:
        Proposals with xyxy boxes clipped to [0, 1] and fused objectness scores.
    """
    boxes = convert_boxes(prediction.boxes_cxcywh, src="norm_cxcywh", dst="norm_xyxy")
    scores = prediction.heads.fuse(prediction.logits)
    if valid is None:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    return Proposals(boxes=boxes.clamp(0.0, 1.0), scores=scores, valid=valid, embeddings=embeddings)
