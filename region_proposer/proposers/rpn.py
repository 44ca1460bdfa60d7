"""``RPNProposer``: the Faster R-CNN region proposal network from torchvision's detection pieces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from mmengine.structures import InstanceData
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)

from ..box_ops import denormalize_boxes, normalize_boxes
from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .base import BaseProposer

__all__ = ["RPNProposer"]


class _RPNOutputs(NamedTuple):
    objectness: Tensor  # (B * A, 1) logits, image-major, levels concatenated
    deltas: Tensor  # (B * A, 4) box deltas w.r.t. the anchors
    anchors: Tensor  # (A, 4) absolute xyxy anchors of the padded image (same for every image)
    num_per_level: list[int]  # anchors per level, summing to A


@MODELS.register_module()
class RPNProposer(BaseProposer):
    """Region proposal network (Ren et al. 2015) over the levels of a ``FeaturePyramid``.

    One shared ``RPNHead`` runs on every level (so all levels need ``in_channels`` channels);
    anchors come from torchvision's ``AnchorGenerator`` at the pyramid's own (possibly
    fractional, e.g. 14 / 4 for a ViT-14) strides; ``RegionProposalNetwork`` supplies the box
    coder, IoU matcher, fg/bg sampler, NMS filtering and losses.

    Args:
        in_channels: Channels of every pyramid level (an int, or one equal value per level).
        anchor_scales: Anchor sizes relative to each level's stride (size = scale * stride).
            Defaults to ``(8.0,)`` (32 px anchors at stride 4, as in FPN).
        anchor_sizes: Absolute anchor sizes in pixels, one sequence per level; overrides
            ``anchor_scales``. Every level must have the same number. Defaults to None.
        aspect_ratios: Anchor height / width ratios. Defaults to ``(0.5, 1.0, 2.0)``.
        conv_depth: 3x3 convolutions in the head. Defaults to 1.
        fg_iou_thresh: IoU above which an anchor is foreground. Defaults to 0.7.
        bg_iou_thresh: IoU below which an anchor is background. Defaults to 0.3.
        batch_size_per_image: Anchors sampled per image for the loss. Defaults to 256.
        positive_fraction: Fraction of positives among them. Defaults to 0.5.
        pre_nms_top_n: Top anchors kept per level before NMS,
            ``dict(training=..., testing=...)``. Defaults to 2000 / 1000.
        post_nms_top_n: Proposals kept per image after NMS (also the padded N),
            ``dict(training=..., testing=...)``. Defaults to 1000 / 300.
        nms_thresh: NMS IoU threshold. Defaults to 0.7.
        score_thresh: Minimum objectness probability. Defaults to 0.
    """

    def __init__(
        self,
        *,
        in_channels: int | Sequence[int],
        anchor_scales: Sequence[float] = (8.0,),
        anchor_sizes: Sequence[Sequence[float]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        conv_depth: int = 1,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int):
            if len(set(in_channels)) != 1:
                raise ValueError(
                    f"RPNProposer shares one head across levels; got in_channels "
                    f"{list(in_channels)}"
                )
            in_channels = int(in_channels[0])
        self.in_channels = in_channels
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.anchor_sizes = _check_anchor_sizes(anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        sizes_per_cell = len(self.anchor_sizes[0]) if self.anchor_sizes else len(self.anchor_scales)
        num_anchors = sizes_per_cell * len(self.aspect_ratios)
        if num_anchors == 0:
            raise ValueError("need at least one anchor size (or scale) and one aspect ratio")
        # The generator given here holds the stride-relative template; the per-pyramid one
        # (absolute sizes) is built in _anchors, since strides come from the FeaturePyramid.
        self.rpn = RegionProposalNetwork(
            anchor_generator=AnchorGenerator((self.anchor_scales,), (self.aspect_ratios,)),
            head=RPNHead(in_channels, num_anchors, conv_depth=conv_depth),
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n=pre_nms_top_n or dict(training=2000, testing=1000),
            post_nms_top_n=post_nms_top_n or dict(training=1000, testing=300),
            nms_thresh=nms_thresh,
            score_thresh=score_thresh,
        )

    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Proposals of every image, padded to ``post_nms_top_n`` (of the current mode).

        Args:
            feats: Pyramid of the padded batch; every level has ``in_channels`` channels.
            instances: Ignored.

        Returns:
            ``Proposals`` with boxes normalised to each unpadded image and scores =
            sigmoid(objectness).
        """
        return self._proposals(feats, self._predict(feats))

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals and the RPN losses ``loss_rpn_objectness`` and ``loss_rpn_box``.

        Args:
            feats: Pyramid of the padded batch.
            instances: One ``InstanceData`` per image with ``bboxes`` (M_i, 4) normalised xyxy
                of the unpadded image; M_i may be 0 (all sampled anchors are then negatives).

        Returns:
            The proposals (as :meth:`forward`) and the two scalar losses.
        """
        if len(instances) != feats.batch_size:
            raise ValueError(f"got {len(instances)} instances for a batch of {feats.batch_size}")
        outputs = self._predict(feats)
        proposals = self._proposals(feats, outputs)
        sizes = _valid_sizes(feats)
        anchors = [outputs.anchors] * feats.batch_size
        targets = [
            {"boxes": denormalize_boxes(inst.bboxes.to(outputs.anchors).reshape(-1, 4), size)}
            for inst, size in zip(instances, sizes.tolist(), strict=True)
        ]
        labels, matched_gt = self.rpn.assign_targets_to_anchors(anchors, targets)
        labels = [
            _ignore_padding(lab, outputs.anchors, size)
            for lab, size in zip(labels, sizes, strict=True)
        ]
        regression_targets = self.rpn.box_coder.encode(matched_gt, anchors)
        loss_objectness, loss_box = self.rpn.compute_loss(
            outputs.objectness, outputs.deltas, labels, list(regression_targets)
        )
        return proposals, {"loss_rpn_objectness": loss_objectness, "loss_rpn_box": loss_box}

    def _predict(self, feats: FeaturePyramid) -> _RPNOutputs:
        if any(c != self.in_channels for c in feats.channels):
            raise ValueError(
                f"RPNProposer shares one head across levels and needs {self.in_channels} channels "
                f"on every level, got {feats.channels}"
            )
        objectness, deltas = self.rpn.head(list(feats.maps))
        num_per_level = [int(o[0].numel()) for o in objectness]  # A_l * H_l * W_l per image
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        return _RPNOutputs(objectness, deltas, self._anchors(feats), num_per_level)

    def _anchors(self, feats: FeaturePyramid) -> Tensor:
        """(A, 4) absolute xyxy anchors over all levels, at the pyramid's float strides."""
        sizes = self.anchor_sizes or tuple(
            tuple(scale * stride for scale in self.anchor_scales) for stride in feats.strides
        )
        if len(sizes) != len(feats.maps):
            raise ValueError(f"anchor_sizes has {len(sizes)} levels, the pyramid {len(feats.maps)}")
        generator = AnchorGenerator(sizes, (self.aspect_ratios,) * len(sizes))
        device = feats.maps[0].device
        generator.set_cell_anchors(torch.float32, device)
        height, width = feats.image_size
        grid_sizes = [list(m.shape[-2:]) for m in feats.maps]
        # AnchorGenerator.forward would use integer strides (image // grid), misplacing anchors
        # when the stride is fractional; grid_anchors takes the exact ones.
        strides = [
            [torch.tensor(height / h, device=device), torch.tensor(width / w, device=device)]
            for h, w in grid_sizes
        ]
        return torch.cat(generator.grid_anchors(grid_sizes, strides)).float()

    def _proposals(self, feats: FeaturePyramid, outputs: _RPNOutputs) -> Proposals:
        batch = feats.batch_size
        decoded = self.rpn.box_coder.decode(outputs.deltas.detach(), [outputs.anchors] * batch)
        sizes = _valid_sizes(feats)
        boxes, scores = self.rpn.filter_proposals(
            decoded.view(batch, -1, 4),
            outputs.objectness,
            [(int(h), int(w)) for h, w in sizes.tolist()],
            outputs.num_per_level,
        )
        num = self.rpn.post_nms_top_n()
        out_boxes = outputs.anchors.new_zeros(batch, num, 4)
        out_scores = outputs.anchors.new_zeros(batch, num)
        valid = torch.zeros(batch, num, dtype=torch.bool, device=out_boxes.device)
        for i, (boxes_i, scores_i) in enumerate(zip(boxes, scores, strict=True)):
            count = len(scores_i)
            out_boxes[i, :count] = normalize_boxes(boxes_i.float(), sizes[i].tolist())
            out_scores[i, :count] = scores_i.float()
            valid[i, :count] = True
        return Proposals(boxes=out_boxes, scores=out_scores, valid=valid)


def _check_anchor_sizes(
    anchor_sizes: Sequence[Sequence[float]] | None,
) -> tuple[tuple[float, ...], ...] | None:
    if anchor_sizes is None:
        return None
    sizes = tuple(tuple(float(s) for s in level) for level in anchor_sizes)
    if not sizes or len({len(level) for level in sizes}) != 1:
        raise ValueError(
            f"anchor_sizes needs the same number of sizes on every level (one shared head), "
            f"got {anchor_sizes}"
        )
    return sizes


def _valid_sizes(feats: FeaturePyramid) -> Tensor:
    """(B, 2) int (h, w) of each unpadded image (the padded size when nothing is padded)."""
    if feats.valid_sizes is not None:
        return feats.valid_sizes.cpu()
    return torch.tensor([list(feats.image_size)] * feats.batch_size)


def _ignore_padding(labels: Tensor, anchors: Tensor, size: Tensor) -> Tensor:
    """Marks anchors centred in the padding as ignored (-1) rather than background.

    Padding is not image content: training it as background would teach the head about the
    batch's padding pattern.
    """
    height, width = (float(v) for v in size.tolist())
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    outside = (centres[:, 0] >= width) | (centres[:, 1] >= height)
    return labels.masked_fill(outside.to(labels.device), -1.0)
