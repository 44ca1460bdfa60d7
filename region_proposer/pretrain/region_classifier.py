"""``RegionClassifier``: an auxiliary stage-1 loss that names each ground-truth box's category.

A proposer trained class-agnostically only has to tell objects from background, so a backbone
trained from scratch with it keeps little of what distinguishes one object from another (linear
probes on the tiny synthetic stage-1 pyramid read shape at 0.81, ``docs/NOTES.md``). A large
pretrained backbone (DINOv2, CLIP) brings that knowledge with it; a small one learns it from this
head, which classifies every ground-truth box from a RoIAlign of the very pyramid the region
encoder reads later. The proposer and its losses are unchanged, and the head is not used at
inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.roi_pooling import boxes_to_pixels, pool_levels
from ..registry import MODELS
from ..structures import FeaturePyramid


@MODELS.register_module()
class RegionClassifier(nn.Module):
    """Classifies boxes from multi-level RoIAlign features of a ``FeaturePyramid``.

    Each chosen level is pooled to ``roi_size x roi_size`` at its real stride
    (``aligned=True``), projected by a 1x1 convolution to ``hidden_dim``, the levels summed,
    flattened and mapped by an MLP to ``num_classes`` logits.

    Args:
        in_channels: Channels of each pyramid level.
        num_classes: Number of categories.
        roi_size: RoIAlign output cells per side. Defaults to 4.
        hidden_dim: Width of the projections and the MLP. Defaults to 128.
        levels: Pyramid levels to pool from. Defaults to all.
        weight: Weight of ``loss_region_cls``. Defaults to 1.0.
        sampling_ratio: Bilinear samples per cell and axis. Defaults to 2.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_classes: int,
        roi_size: int = 4,
        hidden_dim: int = 128,
        levels: Sequence[int] | None = None,
        weight: float = 1.0,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in in_channels)
        self.levels = tuple(range(len(channels))) if levels is None else tuple(levels)
        if num_classes < 2:
            raise ValueError(f"RegionClassifier.num_classes must be >= 2, got {num_classes}")
        if roi_size < 1 or hidden_dim < 1:
            raise ValueError(f"roi_size and hidden_dim must be >= 1, got {roi_size}, {hidden_dim}")
        if not self.levels or not all(0 <= lvl < len(channels) for lvl in self.levels):
            raise ValueError(f"levels {self.levels} must lie in [0, {len(channels)})")
        if weight <= 0:
            raise ValueError(f"RegionClassifier.weight must be > 0, got {weight}")
        self.num_classes = num_classes
        self.roi_size, self.weight, self.sampling_ratio = roi_size, weight, sampling_ratio
        self.level_proj = nn.ModuleList(
            nn.Conv2d(channels[lvl], hidden_dim, kernel_size=1) for lvl in self.levels
        )
        self.head = nn.Sequential(
            nn.Linear(hidden_dim * roi_size * roi_size, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, pyramid: FeaturePyramid, boxes: Sequence[Tensor]) -> Tensor:
        """(sum M_b, num_classes) logits of ``boxes[b]`` (M_b, 4), normalised xyxy of the
        unpadded image b."""
        rois = boxes_to_pixels(pyramid, boxes)
        pooled = pool_levels(
            pyramid,
            rois,
            levels=self.levels,
            roi_size=self.roi_size,
            sampling_ratio=self.sampling_ratio,
        )
        fused = sum(proj(p) for proj, p in zip(self.level_proj, pooled, strict=True))
        return self.head(fused.flatten(1))

    def loss(
        self, pyramid: FeaturePyramid, boxes: Sequence[Tensor], labels: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """``loss_region_cls`` (weighted cross-entropy, mean over boxes) and ``region_cls_acc``.

        Args:
            pyramid: The backbone's pyramid of the batch.
            boxes: ``boxes[b]`` (M_b, 4) normalised xyxy ground-truth boxes of image b.
            labels: ``labels[b]`` (M_b,) long category indices in ``[0, num_classes)``.
        """
        for b, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            if len(box) != len(label):
                raise ValueError(f"image {b}: {len(box)} boxes but {len(label)} labels")
        target = torch.cat([torch.as_tensor(lb, dtype=torch.long) for lb in labels]).to(
            pyramid.maps[0].device
        )
        if target.numel() and not bool(((target >= 0) & (target < self.num_classes)).all()):
            raise ValueError(
                f"region labels must lie in [0, {self.num_classes}), got "
                f"{sorted(set(target.tolist()))}"
            )
        logits = self(pyramid, boxes)
        if target.numel() == 0:  # no box in the batch: a zero loss that still reaches every weight
            zero = logits.sum() * 0.0
            return {"loss_region_cls": zero, "region_cls_acc": zero.detach()}
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss_region_cls": self.weight * loss, "region_cls_acc": accuracy.detach()}
