"""``RegionClassifier``: an auxiliary stage-1 loss that names each ground-truth box's category.

A proposer trained class-agnostically only has to tell objects from background, so a backbone
trained from scratch with it keeps little of what distinguishes one object from another (linear
probes on the tiny synthetic stage-1 pyramid read shape at 0.81, ``docs/NOTES.md``). A large
pretrained backbone (DINOv2, CLIP) brings that knowledge with it; a small one learns it from this
head, which classifies every ground-truth box from a RoIAlign of the very pyramid the region
encoder reads later. The proposer and its losses are unchanged, and the head is not used at
inference.

``pixel_roi_size > 0`` adds a second expert that reads the box's pixels: a small CNN on a
RoIAlign of the normalised input image, trained on ``pixel_views`` randomly jittered copies of each
ground-truth box (the chat stages read loose proposals too). At this scale the pyramid names the
shape of ~0.85-0.9 of the boxes after 600 iterations; a 16x16 pixel crop and a three-layer CNN
reach ~0.95 on test boxes after as many crop views (``docs/NOTES.md``, "Pixel shape expert").
The experts keep their own losses (the pyramid's gradient into the backbone is unchanged) and
``forward`` returns their product (summed log-probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..layers.roi_pooling import boxes_to_pixels, pixel_stem, pool_levels
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
        pixel_roi_size: Cells per side of the input-image RoIAlign that the pixel expert reads;
            0 (the default) turns it off.
        pixel_width: Channels of the pixel CNN's first convolution. Defaults to 32.
        pixel_views: Jittered copies of each ground-truth box the pixel expert trains on per
            step. Defaults to 1.
        pixel_jitter: Each box edge moves by up to this fraction of the box's width or height
            (uniform) in each training view. Defaults to 0.0.
        pixel_weight: Weight of ``loss_pixel_cls``. Defaults to 1.0.
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
        pixel_roi_size: int = 0,
        pixel_width: int = 32,
        pixel_views: int = 1,
        pixel_jitter: float = 0.0,
        pixel_weight: float = 1.0,
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
        if pixel_roi_size < 0 or pixel_views < 1 or not 0.0 <= pixel_jitter < 0.5:
            raise ValueError(
                "RegionClassifier needs pixel_roi_size >= 0, pixel_views >= 1 and "
                f"0 <= pixel_jitter < 0.5, got {pixel_roi_size}, {pixel_views}, {pixel_jitter}"
            )
        if pixel_weight <= 0:
            raise ValueError(f"RegionClassifier.pixel_weight must be > 0, got {pixel_weight}")
        self.num_classes = num_classes
        self.pixel_roi_size, self.pixel_views = pixel_roi_size, pixel_views
        self.pixel_jitter, self.pixel_weight = pixel_jitter, pixel_weight
        self.pixel_head = (
            _pixel_cnn(pixel_roi_size, pixel_width, num_classes) if pixel_roi_size else None
        )
        self.roi_size, self.weight, self.sampling_ratio = roi_size, weight, sampling_ratio
        self.level_proj = nn.ModuleList(
            nn.Conv2d(channels[lvl], hidden_dim, kernel_size=1) for lvl in self.levels
        )
        self.head = nn.Sequential(
            nn.Linear(hidden_dim * roi_size * roi_size, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(
        self, pyramid: FeaturePyramid, boxes: Sequence[Tensor], image: Tensor | None = None
    ) -> Tensor:
        """(sum M_b, num_classes) logits of ``boxes[b]`` (M_b, 4), normalised xyxy of the
        unpadded image b. With the pixel expert, ``image`` (B, 3, H, W) is the padded input
        batch and the result is the sum of both experts' log-probabilities."""
        logits = self.pyramid_logits(pyramid, boxes)
        if self.pixel_head is None:
            return logits
        pixel = self.pixel_logits(pyramid, boxes, image)
        return logits.log_softmax(-1) + pixel.log_softmax(-1)

    def pyramid_logits(self, pyramid: FeaturePyramid, boxes: Sequence[Tensor]) -> Tensor:
        """(sum M_b, num_classes) logits of the pyramid expert."""
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

    def pixel_logits(
        self, pyramid: FeaturePyramid, boxes: Sequence[Tensor], image: Tensor | None
    ) -> Tensor:
        """(sum M_b, num_classes) logits of the pixel expert (RoIAlign of ``image``, stride 1)."""
        if self.pixel_head is None:
            raise ValueError("RegionClassifier has no pixel expert (pixel_roi_size=0)")
        if image is None:
            raise ValueError(
                f"RegionClassifier(pixel_roi_size={self.pixel_roi_size}) needs the input image: "
                "call it with image=inputs"
            )
        if image.ndim != 4 or tuple(image.shape[:2]) != (pyramid.batch_size, 3):
            raise ValueError(
                f"image must be (B, 3, H, W) with B={pyramid.batch_size}, got {tuple(image.shape)}"
            )
        rois = boxes_to_pixels(pyramid, boxes)
        crops = roi_align(
            image.float(),
            [r.float() for r in rois],
            output_size=self.pixel_roi_size,
            spatial_scale=1.0,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )
        return self.pixel_head(crops)

    def _jittered(self, boxes: Sequence[Tensor]) -> list[Tensor]:
        """``pixel_views`` copies of each image's boxes, each edge moved by up to
        ``pixel_jitter`` of the box's extent, clipped to the image."""
        out = []
        for box in boxes:
            views = box.repeat(self.pixel_views, 1)
            if self.pixel_jitter > 0 and len(views):
                extent = (views[:, 2:] - views[:, :2]).repeat(1, 2)
                noise = (torch.rand_like(views) * 2 - 1) * self.pixel_jitter * extent
                views = (views + noise).clamp(0.0, 1.0)
            out.append(views)
        return out

    def loss(
        self,
        pyramid: FeaturePyramid,
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        image: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss_region_cls`` (weighted cross-entropy, mean over boxes) and ``region_cls_acc``;
        with the pixel expert also ``loss_pixel_cls`` and ``pixel_cls_acc`` over its jittered
        views.

        Args:
            pyramid: The backbone's pyramid of the batch.
            boxes: ``boxes[b]`` (M_b, 4) normalised xyxy ground-truth boxes of image b.
            labels: ``labels[b]`` (M_b,) long category indices in ``[0, num_classes)``.
            image: (B, 3, H, W) padded input batch; needed by the pixel expert.
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
        logits = self.pyramid_logits(pyramid, boxes)
        losses = self._ce(logits, target, "region", self.weight)
        if self.pixel_head is not None:
            views = self._jittered(boxes)
            pixel = self.pixel_logits(pyramid, views, image)
            # views are laid out per image, view-major: repeat each image's labels accordingly
            view_target = torch.cat(
                [torch.as_tensor(lb, dtype=torch.long).repeat(self.pixel_views) for lb in labels]
            ).to(target.device)
            losses.update(self._ce(pixel, view_target, "pixel", self.pixel_weight))
        return losses

    @staticmethod
    def _ce(logits: Tensor, target: Tensor, name: str, weight: float) -> dict[str, Tensor]:
        if target.numel() == 0:  # no box in the batch: a zero loss that still reaches every weight
            zero = logits.sum() * 0.0
            return {f"loss_{name}_cls": zero, f"{name}_cls_acc": zero.detach()}
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return {f"loss_{name}_cls": weight * loss, f"{name}_cls_acc": accuracy.detach()}


def _pixel_cnn(size: int, width: int, num_classes: int) -> nn.Sequential:
    """(K, 3, size, size) RoI pixels -> (K, num_classes): a 3x3 convolution at full resolution,
    two stride-2 ones, global average pooling and a linear layer."""
    return nn.Sequential(
        *pixel_stem(width, (1, 2, 4)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(4 * width, num_classes),
    )
