"""The public contract of ``region_proposer``: ``FeaturePyramid`` in, ``Proposals`` out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_leading_dims, check_tensor

_BOOL = (torch.bool,)
_INT = (torch.int32, torch.int64)


@dataclass(frozen=True)
class FeaturePyramid:
    """Multi-scale image features: all a proposer or region encoder knows about the image.

    Attributes:
        maps: One tensor per level, each (B, C_i, H_i, W_i), finest first.
        strides: Input pixels per feature cell, one per map, derived from the shapes
            (``image_size[0] / H_i``); build with :meth:`from_maps` rather than typing them.
        image_size: (H, W) of the padded batch the strides refer to.
        valid_sizes: (B, 2) integer (h, w) of each image inside the padded batch, or None when
            no image is padded. Proposal boxes are normalised to these sizes.
    """

    maps: tuple[Tensor, ...]
    strides: tuple[float, ...]
    image_size: tuple[int, int]
    valid_sizes: Tensor | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.maps, tuple) or not self.maps:
            raise ValueError(f"{owner}.maps must be a non-empty tuple of tensors")
        if len(self.strides) != len(self.maps):
            raise ValueError(
                f"{owner}.strides has {len(self.strides)} entries for {len(self.maps)} maps"
            )
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"{owner}.image_size must be a positive (H, W), got {self.image_size}")
        for i, fmap in enumerate(self.maps):
            check_tensor(owner, f"maps[{i}]", fmap, ndim=4, floating=True)
        check_leading_dims(owner, "maps[0]", {f"maps[{i}]": m for i, m in enumerate(self.maps)}, 1)
        for i, (fmap, stride) in enumerate(zip(self.maps, self.strides, strict=True)):
            self._check_stride(owner, i, fmap, stride)
        if self.valid_sizes is not None:
            check_tensor(owner, "valid_sizes", self.valid_sizes, ndim=2, dtypes=_INT, last_dim=2)
            if self.valid_sizes.shape[0] != self.batch_size:
                raise ValueError(
                    f"{owner}.valid_sizes has {self.valid_sizes.shape[0]} rows for batch size "
                    f"{self.batch_size}"
                )
            limit = torch.tensor(self.image_size, device=self.valid_sizes.device)
            if bool((self.valid_sizes <= 0).any()) or bool((self.valid_sizes > limit).any()):
                raise ValueError(
                    f"{owner}.valid_sizes must lie in [1, image_size={self.image_size}], "
                    f"got {self.valid_sizes.tolist()}"
                )

    def _check_stride(self, owner: str, i: int, fmap: Tensor, stride: float) -> None:
        # A level covers the padded image up to one cell of rounding (floor or ceil pooling).
        height, width = self.image_size
        h, w = fmap.shape[-2:]
        if not (stride > 0 and math.isfinite(stride)):
            raise ValueError(f"{owner}.strides[{i}] must be positive and finite, got {stride}")
        for axis, cells, pixels in (("H", h, height), ("W", w, width)):
            if abs(cells * stride - pixels) > stride:
                raise ValueError(
                    f"{owner}.strides[{i}]={stride} does not match maps[{i}] ({axis}={cells} cells "
                    f"for {pixels} pixels); derive strides with FeaturePyramid.from_maps"
                )

    @classmethod
    def from_maps(
        cls,
        maps: tuple[Tensor, ...] | list[Tensor],
        image_size: tuple[int, int],
        valid_sizes: Tensor | None = None,
    ) -> FeaturePyramid:
        """Builds a pyramid whose strides are derived from the map shapes.

        Args:
            maps: Feature maps, each (B, C_i, H_i, W_i).
            image_size: (H, W) of the padded input batch.
            valid_sizes: Optional (B, 2) unpadded (h, w) per image.

        Returns:
            The pyramid with ``strides[i] = image_size[0] / H_i``.
        """
        maps = tuple(maps)
        strides = tuple(float(image_size[0]) / float(m.shape[-2]) for m in maps)
        return cls(
            maps=maps, strides=strides, image_size=tuple(image_size), valid_sizes=valid_sizes
        )

    @property
    def batch_size(self) -> int:
        """Number of images B."""
        return int(self.maps[0].shape[0])

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels C_i per level."""
        return tuple(int(m.shape[1]) for m in self.maps)

    def select(self, index: Tensor) -> FeaturePyramid:
        """The pyramid of the images ``index`` (1-D long) of the batch, in that order."""
        return FeaturePyramid(
            maps=tuple(m[index] for m in self.maps),
            strides=self.strides,
            image_size=self.image_size,
            valid_sizes=None if self.valid_sizes is None else self.valid_sizes[index],
        )


@dataclass(frozen=True)
class Proposals:
    """Region proposals for a batch, padded to N per image.

    Attributes:
        boxes: (B, N, 4) float xyxy, normalised to [0, 1] of each unpadded image.
        scores: (B, N) float objectness in [0, 1].
        valid: (B, N) bool; False marks padding.
        embeddings: (B, N, D) float proposer query features, or None.
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    embeddings: Tensor | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_tensor(owner, "boxes", self.boxes, ndim=3, floating=True, last_dim=4)
        check_tensor(owner, "scores", self.scores, ndim=2, floating=True)
        check_tensor(owner, "valid", self.valid, ndim=2, dtypes=_BOOL)
        if self.embeddings is not None:
            check_tensor(owner, "embeddings", self.embeddings, ndim=3, floating=True)
        check_leading_dims(
            owner,
            "boxes",
            {
                "boxes": self.boxes,
                "scores": self.scores,
                "valid": self.valid,
                "embeddings": self.embeddings,
            },
            2,
        )

    @property
    def batch_size(self) -> int:
        """Number of images B."""
        return int(self.boxes.shape[0])

    @property
    def num_proposals(self) -> int:
        """Padded number of proposals N per image."""
        return int(self.boxes.shape[1])

    @classmethod
    def empty(cls, batch_size: int, *, device: torch.device | str = "cpu") -> Proposals:
        """Proposals with N = 0 for every image (e.g. an oracle on images without objects)."""
        return cls(
            boxes=torch.zeros(batch_size, 0, 4, device=device),
            scores=torch.zeros(batch_size, 0, device=device),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )
