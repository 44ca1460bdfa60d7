"""Random inputs shaped like real ones, for tests and benchmarks of proposers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from mmengine.structures import InstanceData

from .structures import FeaturePyramid


def random_vit_pyramid(
    valid_sizes: Sequence[tuple[int, int]],
    *,
    channels: int,
    scales: Sequence[float],
    patch: int = 14,
    seed: int = 0,
) -> FeaturePyramid:
    """Random maps sized as a ViT pyramid of a padded batch.

    Args:
        valid_sizes: Unpadded (h, w) per image; the batch pads to a patch multiple of the largest.
        channels: Channels of every map.
        scales: Pyramid scales relative to the patch grid (e.g. (2.0, 1.0, 0.5)).
        patch: ViT patch size. Defaults to 14.
        seed: Generator seed. Defaults to 0.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = (
        math.ceil(max(h for h, _ in valid_sizes) / patch),
        math.ceil(max(w for _, w in valid_sizes) / patch),
    )
    maps = [
        torch.randn(len(valid_sizes), channels, int(grid[0] * s), int(grid[1] * s), generator=gen)
        for s in scales
    ]
    image_size = (grid[0] * patch, grid[1] * patch)
    return FeaturePyramid.from_maps(maps, image_size, valid_sizes=torch.tensor(valid_sizes))


def box_instances(
    boxes_per_image: Sequence[Sequence[Sequence[float]]], sources: Sequence[str] | None = None
) -> list[InstanceData]:
    """Ground truth per image: normalised xyxy ``bboxes`` plus ``sample_id``/``source`` meta."""
    sources = list(sources or ["default"] * len(boxes_per_image))
    return [
        InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            metainfo=dict(sample_id=str(i), source=sources[i]),
        )
        for i, boxes in enumerate(boxes_per_image)
    ]
