"""RoIAlign of regions on a ``FeaturePyramid``: the box frame and the per-level pooling that the
stage-1 region classifier and groma_px's region encoder share, and the convolutional stem that
their pixel branches and the box refiner put on RoIAligned image crops."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import roi_align

from ..structures import FeaturePyramid


def boxes_to_pixels(pyramid: FeaturePyramid, boxes: Sequence[Tensor]) -> list[Tensor]:
    """Normalised xyxy of each unpadded image -> absolute pixel xyxy of the padded batch.

    Args:
        pyramid: Gives each image's valid (h, w) (``image_size`` when nothing is padded).
        boxes: ``boxes[b]`` is (K_b, 4) normalised xyxy of image b.

    Returns:
        ``rois[b]``: (K_b, 4) pixel boxes of image b (images are top-left aligned in the batch).
    """
    if len(boxes) != pyramid.batch_size:
        raise ValueError(f"got boxes for {len(boxes)} images, batch size {pyramid.batch_size}")
    like = pyramid.maps[0]
    if pyramid.valid_sizes is not None:
        sizes = pyramid.valid_sizes.to(device=like.device, dtype=like.dtype)
    else:
        sizes = like.new_tensor(pyramid.image_size).expand(len(boxes), 2)
    scale = sizes.flip(-1).repeat(1, 2)  # (B, 4): w, h, w, h
    return [norm * scale[b].to(norm.dtype) for b, norm in enumerate(boxes)]


def pool_levels(
    pyramid: FeaturePyramid,
    rois: Sequence[Tensor],
    *,
    levels: Sequence[int],
    roi_size: int,
    sampling_ratio: int,
    scale_factor: float = 1.0,
) -> list[Tensor]:
    """RoIAlign (``aligned=True``) of pixel boxes on each chosen level at its real stride.

    Args:
        pyramid: Feature maps, each (B, C_i, H_i, W_i), with their strides.
        rois: ``rois[b]`` is (K_b, 4) absolute pixel xyxy of the padded batch
            (:func:`boxes_to_pixels`).
        levels: Indices of the levels to pool from.
        roi_size: Output cells per side.
        sampling_ratio: Bilinear samples per output cell and axis (0: adaptive).
        scale_factor: Multiplies every level's ``1 / stride`` (1 except to reproduce a peer's
            mis-scaled strides). Defaults to 1.0.

    Returns:
        One (sum K_b, C_i, roi_size, roi_size) tensor per level, regions in batch order.
    """
    pooled = []
    for level in levels:
        fmap = pyramid.maps[level]
        pooled.append(
            roi_align(
                fmap,
                [r.to(fmap.dtype) for r in rois],
                output_size=roi_size,
                spatial_scale=scale_factor / pyramid.strides[level],
                sampling_ratio=sampling_ratio,
                aligned=True,  # pixel centres at +0.5 (detectron2 ROIAlignV2)
            )
        )
    return pooled


def pixel_stem(width: int, multipliers: Sequence[int]) -> list[nn.Module]:
    """Layers of a small CNN on (K, 3, S, S) RoI pixels: a 3x3 convolution at full resolution to
    ``width * multipliers[0]`` channels, then one stride-2 3x3 convolution per further multiplier
    (``width * m`` channels), each followed by GELU. Returned as a list, so that callers splice it
    into their own ``nn.Sequential`` (their parameter names stay flat). The spatial side after it
    is ``ceil(S / 2 ** (len(multipliers) - 1))``."""
    if width < 1 or not multipliers or min(multipliers) < 1:
        raise ValueError(
            f"pixel_stem needs width >= 1 and multipliers >= 1, got {width}, {multipliers}"
        )
    layers: list[nn.Module] = []
    channels = 3
    for i, mult in enumerate(multipliers):
        layers += [nn.Conv2d(channels, width * mult, 3, stride=1 if i == 0 else 2, padding=1)]
        layers += [nn.GELU()]
        channels = width * mult
    return layers
