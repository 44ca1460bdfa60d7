"""``BoxRefiner``: a second, RoI stage that tightens proposal boxes from the pixels around them.

A DETR-style proposer localises slowly: after the tiny CPU pipeline's 600 stage-1 iterations
only ~0.29 of the ground-truth objects have a kept proposal at IoU >= 0.85 and ~0.23 only one at
0.5-0.7. Loose boxes are what hold referring accuracy back (``docs/NOTES.md``, "What limits
REC"): the region encoder then reads part of the object and part of its neighbours. As in the
second stage of Fast/Cascade R-CNN, this head regresses each box's edges from a RoIAlign of the
box enlarged by ``context`` — here of the normalised input image at stride 1, so it sees edges at
full resolution — with a small CNN, and is applied ``num_steps`` times at inference. It trains in
stage 1 on jittered copies of the ground-truth boxes (no gradient reaches the backbone) and then
refines the proposer's boxes wherever they are used: stage-1 evaluation, cached proposals, the
chat stages and inference. Duplicates that converge on one object are removed by the region
selector's NMS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from ..box_ops import denormalize_boxes
from ..layers.roi_pooling import pixel_stem
from ..registry import MODELS
from ..structures import Proposals


@MODELS.register_module()
class BoxRefiner(nn.Module):
    """Regresses refined boxes from the input pixels around each box.

    Each box (normalised xyxy of its unpadded image) is enlarged about its centre by
    ``context``, RoIAligned from the image to ``roi_size x roi_size`` (``aligned=True``), and a
    CNN predicts the four edge offsets in units of the enlarged box's extent. The last layer
    starts at zero, so an untrained refiner returns its input boxes.

    Args:
        roi_size: RoIAlign output cells per side (a multiple of 8). Defaults to 32.
        context: Side of the crop relative to the box (>= 1), so that edges the box cuts off
            are visible. Defaults to 1.5.
        width: Channels of the first convolution (doubled twice). Defaults to 16 (32 costs 4x
            and localised no better on the synthetic scenes, ``docs/NOTES.md``).
        hidden_dim: Width of the MLP after the convolutions. Defaults to 256.
        num_steps: Refinement passes at inference (the same head, applied to its own output).
            Defaults to 2.
        train_views: Jittered copies of each ground-truth box per training step. Defaults to 4.
        jitter: Standard deviation of each edge's training noise, as a share of the box's width
            or height. Defaults to 0.12.
        weight: Weight of ``loss_box_refine``. Defaults to 1.0.
        beta: Smooth-L1 transition point (in units of the crop's extent). Defaults to 0.02.
        min_size: Smallest width and height of a refined box (normalised). Defaults to 1e-3.
        sampling_ratio: Bilinear samples per cell and axis. Defaults to 2.
        score_thr: ``refine_proposals`` refines only the proposals scoring at least this (the
            rest keep their boxes), so that the cost follows the boxes a region selector can
            keep, not the proposer's query count. Defaults to 0.0 (all).
    """

    def __init__(
        self,
        *,
        roi_size: int = 32,
        context: float = 1.5,
        width: int = 16,
        hidden_dim: int = 256,
        num_steps: int = 2,
        train_views: int = 4,
        jitter: float = 0.12,
        weight: float = 1.0,
        beta: float = 0.02,
        min_size: float = 1e-3,
        sampling_ratio: int = 2,
        score_thr: float = 0.0,
    ) -> None:
        super().__init__()
        if roi_size < 8 or roi_size % 8:
            raise ValueError(
                f"BoxRefiner.roi_size must be a positive multiple of 8, got {roi_size}"
            )
        if context < 1.0:
            raise ValueError(f"BoxRefiner.context must be >= 1, got {context}")
        if num_steps < 0 or train_views < 1:
            raise ValueError(
                f"BoxRefiner needs num_steps >= 0 and train_views >= 1, got {num_steps}, "
                f"{train_views}"
            )
        if not 0.0 <= jitter < 0.5 or weight <= 0 or beta <= 0 or not 0 < min_size < 1:
            raise ValueError(
                "BoxRefiner needs 0 <= jitter < 0.5, weight > 0, beta > 0 and 0 < min_size < 1, "
                f"got {jitter}, {weight}, {beta}, {min_size}"
            )
        self.roi_size, self.context, self.num_steps = roi_size, float(context), num_steps
        self.train_views, self.jitter, self.weight = train_views, float(jitter), float(weight)
        self.beta, self.min_size, self.sampling_ratio = float(beta), float(min_size), sampling_ratio
        self.score_thr = float(score_thr)
        cells = (roi_size // 8) ** 2
        self.net = nn.Sequential(
            *pixel_stem(width, (1, 2, 4, 4)),  # three stride-2 convolutions: roi_size / 8 cells
            nn.Flatten(1),
            nn.Linear(4 * width * cells, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 4),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, image: Tensor, boxes: Sequence[Tensor], valid_sizes: Tensor) -> list[Tensor]:
        """``num_steps`` refinement passes.

        Args:
            image: (B, 3, H, W) normalised, padded input batch (images top-left aligned).
            boxes: ``boxes[b]`` (K_b, 4) normalised xyxy of the unpadded image b.
            valid_sizes: (B, 2) each image's unpadded (h, w) in the batch.

        Returns:
            The refined boxes, same layout, valid (x0 < x1, y0 < y1) and inside [0, 1].
        """
        self._check(image, boxes, valid_sizes)
        for _ in range(self.num_steps):
            boxes = [self._valid(b) for b in self._step(image, boxes, valid_sizes)]
        return list(boxes)

    def refine_proposals(
        self, image: Tensor, proposals: Proposals, valid_sizes: Tensor
    ) -> Proposals:
        """``proposals`` with the boxes of the valid ones scoring at least ``score_thr``
        refined; scores, validity and embeddings unchanged."""
        chosen = proposals.valid & (proposals.scores >= self.score_thr)
        picked = [b[m] for b, m in zip(proposals.boxes, chosen, strict=True)]
        refined = self(image, picked, valid_sizes)
        boxes = proposals.boxes.clone()
        boxes[chosen] = torch.cat(refined).to(boxes.dtype)
        return dataclasses.replace(proposals, boxes=boxes)

    def _check(self, image: Tensor, boxes: Sequence[Tensor], valid_sizes: Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"BoxRefiner: image must be (B, 3, H, W), got {tuple(image.shape)}")
        if len(boxes) != image.shape[0] or tuple(valid_sizes.shape) != (image.shape[0], 2):
            raise ValueError(
                f"BoxRefiner: {image.shape[0]} images, {len(boxes)} box sets and valid_sizes "
                f"{tuple(valid_sizes.shape)} (expected ({image.shape[0]}, 2))"
            )
        for b, box in enumerate(boxes):
            if box.ndim != 2 or box.shape[-1] != 4:
                raise ValueError(f"BoxRefiner: boxes[{b}] must be (K, 4), got {tuple(box.shape)}")

    def _crops(self, boxes: Tensor) -> Tensor:
        """Each box enlarged about its centre by ``context`` (normalised, may leave [0, 1])."""
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = (boxes[:, 2:] - boxes[:, :2]) * (self.context / 2)
        return torch.cat([centre - half, centre + half], dim=1)

    def _step(self, image: Tensor, boxes: Sequence[Tensor], valid_sizes: Tensor) -> list[Tensor]:
        """One pass: (K_b, 4) boxes -> (K_b, 4) refined boxes (not yet made valid)."""
        crops = [self._crops(b.float()) for b in boxes]
        sizes = valid_sizes.to(image.device)
        rois = [denormalize_boxes(c, sizes[i]) for i, c in enumerate(crops)]
        pixels = roi_align(
            image.float(),
            rois,
            output_size=self.roi_size,
            spatial_scale=1.0,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )
        offsets = self.net(pixels).split([len(b) for b in boxes])
        return [
            b.float() + d * (c[:, 2:] - c[:, :2]).repeat(1, 2)
            for b, c, d in zip(boxes, crops, offsets, strict=True)
        ]

    def _valid(self, boxes: Tensor) -> Tensor:
        """Ordered corners, at least ``min_size`` wide and high, inside [0, 1]."""
        lo = torch.minimum(boxes[:, :2], boxes[:, 2:]).clamp(0.0, 1.0 - self.min_size)
        hi = torch.maximum(boxes[:, :2], boxes[:, 2:]).clamp(max=1.0)
        hi = torch.maximum(hi, lo + self.min_size)
        return torch.cat([lo, hi], dim=1)

    def jittered(self, boxes: Tensor) -> Tensor:
        """``train_views`` copies of (M, 4) boxes, each edge moved by Gaussian noise of
        ``jitter`` times the box's width or height, made valid."""
        views = boxes.repeat(self.train_views, 1)
        extent = (views[:, 2:] - views[:, :2]).repeat(1, 2)
        return self._valid(views + torch.randn_like(views) * self.jitter * extent)

    def loss(
        self, image: Tensor, boxes: Sequence[Tensor], valid_sizes: Tensor
    ) -> dict[str, Tensor]:
        """``loss_box_refine`` (smooth L1 of one pass from jittered ground-truth views, in units
        of each crop's extent) and, detached, ``refine_iou`` (mean IoU of the refined views with
        their boxes) and ``refine_iou_in`` (of the views themselves).

        Args:
            image: (B, 3, H, W) normalised, padded input batch.
            boxes: ``boxes[b]`` (M_b, 4) normalised xyxy ground-truth boxes of image b.
            valid_sizes: (B, 2) unpadded (h, w) of each image.
        """
        self._check(image, boxes, valid_sizes)
        targets = [b.float().repeat(self.train_views, 1) for b in boxes]
        views = [self.jittered(b.float()) for b in boxes]
        if (
            sum(len(v) for v in views) == 0
        ):  # no box in the batch: a zero loss reaching every weight
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {
                "loss_box_refine": zero,
                "refine_iou": zero.detach(),
                "refine_iou_in": zero.detach(),
            }
        out, target, view = (
            torch.cat(x) for x in (self._step(image, views, valid_sizes), targets, views)
        )
        extent = (view[:, 2:] - view[:, :2]).repeat(1, 2) * self.context
        loss = F.smooth_l1_loss((out - target) / extent, torch.zeros_like(out), beta=self.beta)
        with torch.no_grad():
            iou_out = box_iou(self._valid(out), target).diagonal().mean()
            iou_in = box_iou(view, target).diagonal().mean()
        return {
            "loss_box_refine": self.weight * loss,
            "refine_iou": iou_out,
            "refine_iou_in": iou_in,
        }
