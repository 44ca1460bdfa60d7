"""Region features for the LLM: multi-level RoIAlign on a FeaturePyramid plus a box embedding."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, roi_align

from groma_px.registry import MODELS
from region_proposer.layers.roi_pooling import boxes_to_pixels, pixel_stem, pool_levels
from region_proposer.structures import FeaturePyramid

_FUSIONS = ("sum", "concat")
# Groma declares featmap strides [14/8, 14/4, 14/2] for maps whose real strides are
# [14/4, 14/2, 14] (a 32x32 ViT map at 448 px interpolated to 128/64/32 cells), so its
# spatial_scale is 2x the right one on every level.
LEGACY_GROMA_SCALE_FACTOR = 2.0


def regions_to_pixels(
    pyramid: FeaturePyramid, boxes: Sequence[Tensor], *, legacy_groma_roi: bool = False
) -> list[Tensor]:
    """Normalised xyxy of each unpadded image -> absolute pixel xyxy of the padded batch
    (:func:`region_proposer.layers.boxes_to_pixels`).

    Args:
        pyramid: Gives the per-image valid sizes (or ``image_size`` when nothing is padded).
        boxes: ``boxes[b]`` is (K_b, 4) normalised xyxy of image b.
        legacy_groma_roi: Return Groma's boxes instead: (cx, cy, w, h) in pixels, to be read
            as if they were (x0, y0, x1, y1). Defaults to False.

    Returns:
        ``rois[b]``: (K_b, 4) pixel boxes of image b (top-left aligned in the padded batch).
    """
    if legacy_groma_roi:  # Groma issues 11 and 21: cxcywh fed where xyxy is expected
        boxes = [box_convert(norm, in_fmt="xyxy", out_fmt="cxcywh") for norm in boxes]
    return boxes_to_pixels(pyramid, boxes)


def pool_regions(
    pyramid: FeaturePyramid,
    boxes: Sequence[Tensor],
    *,
    levels: Sequence[int],
    roi_size: int,
    sampling_ratio: int,
    legacy_groma_roi: bool = False,
) -> list[Tensor]:
    """RoIAlign of every region on each chosen pyramid level, at the level's real stride.

    Args:
        pyramid: Feature maps, each (B, C_i, H_i, W_i), with their strides.
        boxes: ``boxes[b]`` is (K_b, 4) normalised xyxy of the unpadded image b.
        levels: Indices of the pyramid levels to pool from.
        roi_size: Output cells per side.
        sampling_ratio: Bilinear samples per output cell and axis (0: adaptive).
        legacy_groma_roi: Reproduce Groma's box format and scale bugs (see
            :class:`RoIRegionEncoder`). Defaults to False.

    Returns:
        One (sum K_b, C_i, roi_size, roi_size) tensor per level, regions in batch order.
    """
    return pool_levels(
        pyramid,
        regions_to_pixels(pyramid, boxes, legacy_groma_roi=legacy_groma_roi),
        levels=levels,
        roi_size=roi_size,
        sampling_ratio=sampling_ratio,
        scale_factor=LEGACY_GROMA_SCALE_FACTOR if legacy_groma_roi else 1.0,
    )


BOX_EMBEDS = ("xyxywh", "shorter_side")


def box_features(boxes: Tensor, image_sizes: Tensor | None = None) -> Tensor:
    """The box-embedding input of each region.

    Args:
        boxes: (K, 4) normalised xyxy.
        image_sizes: (K, 2) (h, w) of the unpadded image of each box, or None.

    Returns:
        (K, 6) (x0, y0, x1, y1, w, h) without ``image_sizes``; with them (K, 8), followed by the
        box's width and height in units of its image's shorter side. Normalised coordinates drop
        the image's aspect ratio, so "a large object" (an extent relative to the image, as in the
        synthetic scenes' size classes) is ambiguous from them alone on non-square images.
    """
    wh = boxes[:, 2:] - boxes[:, :2]
    if image_sizes is None:
        return torch.cat([boxes, wh], dim=1)
    hw = image_sizes.to(boxes.dtype)
    shorter = hw.min(dim=1, keepdim=True).values.clamp(min=1.0)
    return torch.cat([boxes, wh, wh * hw.flip(1) / shorter], dim=1)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


PIXEL_HEADS = ("mlp", "cnn")


def _pixel_cnn(size: int, hidden_dim: int, out_dim: int, width: int = 32) -> nn.Sequential:
    """(K, 3 * size * size) flattened RoI pixels -> (K, out_dim): a 3x3 convolution at full
    resolution, two stride-2 ones, then an MLP (local, shift-tolerant shape features)."""
    cells = -(-size // 4)  # after two stride-2 convolutions with padding 1
    return nn.Sequential(
        nn.Unflatten(1, (3, size, size)),
        *pixel_stem(width, (1, 2, 2)),
        nn.Flatten(1),
        _mlp(2 * width * cells * cells, hidden_dim, out_dim),
    )


@MODELS.register_module()
class RoIRegionEncoder(nn.Module):
    """Multi-level RoIAlign on a FeaturePyramid -> one LLM-width token per region, plus a
    box-position embedding.

    Each chosen level is pooled to ``roi_size x roi_size`` with ``spatial_scale = 1 / stride``
    taken from the pyramid, projected by a per-level 1x1 convolution to ``hidden_dim``, fused
    (summed or concatenated), flattened and mapped by an MLP (Linear-GELU-Linear) to ``out_dim``;
    an MLP of the normalised (x0, y0, x1, y1, w, h) is added.

    ``pixel_roi_size > 0`` adds a low-level branch: RoIAlign of the normalised input image itself
    (stride 1) to ``pixel_roi_size x pixel_roi_size x 3``, flattened and mapped by an MLP, added
    to the token. A detector trained class-agnostically keeps little colour and fine shape in its
    features (linear probes on the tiny stage-1 pyramid read colour at 0.87, shape at 0.81); the
    pixel branch hands them to the LLM directly (``docs/NOTES.md``, "groma_px end to end").

    ``pixel_head="cnn"`` reads the pixel RoI with a small convolutional network (two stride-2
    stages) instead of an MLP on the flattened cells.

    ``legacy_groma_roi=True`` reproduces Groma's released RoI extraction, for ablations only
    (FoundationVision/Groma ``groma/model/roi_align.py``; issues 11 and 21):

    - Box format: Groma feeds the normalised proposals in (cx, cy, w, h), scaled to pixels, to a
      RoIAlign that reads (x0, y0, x1, y1). Here the same pixel (cx, cy, w, h) is given to
      ``roi_align``, so a region is pooled from [cx, w] x [cy, h] (reversed when w < cx).
    - Scale: Groma declares strides [14/8, 14/4, 14/2] for maps at real strides [14/4, 14/2, 14],
      so each level uses ``spatial_scale = LEGACY_GROMA_SCALE_FACTOR / stride`` (factor 2): the
      box lands at twice its coordinates on the map. The real strides still come from the
      pyramid; only the factor is Groma's.

    Groma's hard-coded 448-pixel box scale is not reproduced (boxes scale with the real image
    size), and the box embedding always sees the correct boxes.

    Args:
        in_channels: Channels C of the pooled pyramid levels.
        num_levels: Number of levels in the pyramid (checked in ``forward``).
        out_dim: Token width (the LLM's hidden size).
        roi_size: RoIAlign output cells per side. Defaults to 4.
        hidden_dim: Width of the per-level projection and the MLPs. Defaults to 512.
        levels: Pyramid levels to pool from. Defaults to all.
        fusion: ``"sum"`` or ``"concat"`` of the projected levels. Defaults to ``"sum"``.
        box_embed: Add the box-position embedding: True or ``"xyxywh"`` embeds the normalised
            (x0, y0, x1, y1, w, h); ``"shorter_side"`` adds the box's width and height in units
            of its image's shorter side (the aspect ratio that normalised boxes lose; read from
            the pyramid's ``valid_sizes``); False: none. Defaults to True.
        sampling_ratio: Bilinear samples per output cell and axis (0: adaptive). Defaults to 2.
        legacy_groma_roi: Reproduce Groma's RoI bugs (see above). Defaults to False.
        pixel_roi_size: Cells per side of the input-image RoIAlign branch; 0 turns it off.
            Defaults to 0.
        pixel_head: ``"mlp"`` or ``"cnn"``, the network that reads the pixel RoI. Defaults to
            "mlp".
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        out_dim: int,
        roi_size: int = 4,
        hidden_dim: int = 512,
        levels: Sequence[int] | None = None,
        fusion: str = "sum",
        box_embed: bool | str = True,
        sampling_ratio: int = 2,
        legacy_groma_roi: bool = False,
        pixel_roi_size: int = 0,
        pixel_head: str = "mlp",
    ) -> None:
        super().__init__()
        self.levels = tuple(range(num_levels)) if levels is None else tuple(levels)
        _check_args(in_channels, num_levels, out_dim, roi_size, hidden_dim, self.levels, fusion)
        if sampling_ratio < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0: adaptive), got {sampling_ratio}")
        if pixel_roi_size < 0:
            raise ValueError(f"pixel_roi_size must be >= 0 (0: off), got {pixel_roi_size}")
        if box_embed is True:
            box_embed = "xyxywh"
        if box_embed is not False and box_embed not in BOX_EMBEDS:
            raise ValueError(f"box_embed must be a bool or one of {BOX_EMBEDS}, got {box_embed!r}")
        if pixel_head not in PIXEL_HEADS:
            raise ValueError(f"pixel_head must be one of {PIXEL_HEADS}, got {pixel_head!r}")
        if legacy_groma_roi:
            warnings.warn(
                "RoIRegionEncoder(legacy_groma_roi=True) reproduces Groma's RoI bugs (cxcywh read "
                "as xyxy, 2x spatial scale); use it for ablations only",
                stacklevel=2,
            )
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.out_dim = out_dim
        self.roi_size = roi_size
        self.fusion = fusion
        self.sampling_ratio = sampling_ratio
        self.legacy_groma_roi = legacy_groma_roi
        self.level_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) for _ in self.levels
        )
        fused_channels = hidden_dim * (len(self.levels) if fusion == "concat" else 1)
        self.head = _mlp(fused_channels * roi_size * roi_size, hidden_dim, out_dim)
        self.box_embed_kind = box_embed or None
        box_dims = 8 if box_embed == "shorter_side" else 6
        self.box_embed = _mlp(box_dims, hidden_dim, out_dim) if box_embed else None
        self.pixel_roi_size = pixel_roi_size
        self.pixel_head = None
        if pixel_roi_size and pixel_head == "cnn":
            self.pixel_head = _pixel_cnn(pixel_roi_size, hidden_dim, out_dim)
        elif pixel_roi_size:
            self.pixel_head = _mlp(3 * pixel_roi_size * pixel_roi_size, hidden_dim, out_dim)

    def forward(
        self,
        pyramid: FeaturePyramid,
        boxes: list[Tensor],
        image: Tensor | None = None,
        masks: Sequence[Mapping[int, Tensor]] | None = None,
    ) -> Tensor:
        """Encodes the regions of a batch.

        Args:
            pyramid: Feature maps of the padded batch, ``num_levels`` levels of ``in_channels``.
            boxes: ``boxes[b]`` is (K_b, 4) normalised xyxy of the unpadded image b.
            image: (B, 3, H, W) normalised padded input batch the pyramid was computed from;
                required when ``pixel_roi_size > 0``, ignored otherwise.
            masks: Optional mask prompts: ``masks[b]`` maps a region row of image b to a (h, w)
                mask of the unpadded image. Such a region is mask-pooled: every RoI cell (of
                each level and of the pixel branch) is weighted by the share of the cell the
                mask covers, so only the masked pixels inform its token.

        Returns:
            (sum K_b, out_dim) region tokens in batch order. With no regions at all this is
            (0, out_dim) and still part of the graph (every parameter gets a zero gradient).
        """
        self._check_inputs(pyramid, boxes)
        pooled = pool_regions(
            pyramid,
            boxes,
            levels=self.levels,
            roi_size=self.roi_size,
            sampling_ratio=self.sampling_ratio,
            legacy_groma_roi=self.legacy_groma_roi,
        )
        projected = [proj(p) for proj, p in zip(self.level_proj, pooled, strict=True)]
        if masks is not None and any(masks):
            weights = self._mask_weights(pyramid, boxes, masks, self.roi_size)
            projected = [p * weights.to(p.dtype) for p in projected]
        # (K, hidden, r, r) per level -> (K, hidden or L * hidden, r, r)
        fused = sum(projected) if self.fusion == "sum" else torch.cat(projected, dim=1)
        tokens = self.head(fused.flatten(1))
        if self.box_embed is not None:
            tokens = tokens + self.box_embed(self._box_features(pyramid, boxes).to(tokens.dtype))
        if self.pixel_head is not None:
            pixels = self._pool_pixels(pyramid, boxes, image)
            if masks is not None and any(masks):
                weights = self._mask_weights(pyramid, boxes, masks, self.pixel_roi_size)
                pixels = (pixels.unflatten(1, (3, -1)) * weights.flatten(2)).flatten(1)
            tokens = tokens + self.pixel_head(pixels)
        return tokens

    def _box_features(self, pyramid: FeaturePyramid, boxes: list[Tensor]) -> Tensor:
        """``box_features`` of every region, with its image's size for ``"shorter_side"``."""
        flat = torch.cat(boxes)
        if self.box_embed_kind != "shorter_side":
            return box_features(flat)
        if pyramid.valid_sizes is not None:
            sizes = pyramid.valid_sizes.to(flat.device)
        else:  # unpadded batch: every image is the whole padded size
            sizes = flat.new_tensor(pyramid.image_size).expand(len(boxes), 2)
        counts = torch.tensor([len(b) for b in boxes], device=flat.device)
        return box_features(flat, sizes.repeat_interleave(counts, dim=0))

    def _mask_weights(
        self,
        pyramid: FeaturePyramid,
        boxes: list[Tensor],
        masks: Sequence[Mapping[int, Tensor]],
        size: int,
    ) -> Tensor:
        """(sum K_b, 1, size, size) share of each RoI cell inside the region's mask prompt (1
        for regions without one)."""
        if len(masks) != len(boxes):
            raise ValueError(f"got masks for {len(masks)} images, boxes for {len(boxes)}")
        rois = regions_to_pixels(pyramid, boxes, legacy_groma_roi=self.legacy_groma_roi)
        counts = [len(b) for b in boxes]
        like = pyramid.maps[0]
        weights = like.new_ones(sum(counts), 1, size, size)
        height, width = pyramid.image_size
        start = 0
        for b, (per_image, count) in enumerate(zip(masks, counts, strict=True)):
            for row, mask in per_image.items():
                if not 0 <= row < count:
                    raise ValueError(f"masks[{b}] has row {row}; image {b} has {count} regions")
                h, w = mask.shape[-2:]
                if h > height or w > width:
                    raise ValueError(
                        f"masks[{b}][{row}] is {h}x{w}, larger than the {height}x{width} input"
                    )
                canvas = like.new_zeros(1, 1, height, width)
                canvas[0, 0, :h, :w] = mask.to(like.dtype)
                weights[start + row] = roi_align(
                    canvas,
                    [rois[b][row : row + 1].to(like.dtype)],
                    output_size=size,
                    spatial_scale=1.0,
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )[0]
            start += count
        return weights

    def _pool_pixels(self, pyramid: FeaturePyramid, boxes: list[Tensor], image: Tensor | None):
        """(sum K_b, 3 * p * p) RoIAlign of each region on the input image (stride 1)."""
        if image is None:
            raise ValueError(
                f"{type(self).__name__}(pixel_roi_size={self.pixel_roi_size}) needs the input "
                "image: call forward(pyramid, boxes, image=inputs)"
            )
        expected = (pyramid.batch_size, 3)
        if image.ndim != 4 or tuple(image.shape[:2]) != expected:
            raise ValueError(
                f"image must be (B, 3, H, W) with B={expected[0]}, got {tuple(image.shape)}"
            )
        rois = regions_to_pixels(pyramid, boxes, legacy_groma_roi=self.legacy_groma_roi)
        pooled = roi_align(
            image,
            [r.to(image.dtype) for r in rois],
            output_size=self.pixel_roi_size,
            spatial_scale=1.0,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )
        return pooled.flatten(1)

    def _check_inputs(self, pyramid: FeaturePyramid, boxes: list[Tensor]) -> None:
        if len(pyramid.maps) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_levels} pyramid levels, got "
                f"{len(pyramid.maps)}"
            )
        for level in self.levels:
            if pyramid.channels[level] != self.in_channels:
                raise ValueError(
                    f"pyramid.maps[{level}] has {pyramid.channels[level]} channels, expected "
                    f"in_channels={self.in_channels}"
                )
        if len(boxes) != pyramid.batch_size:
            raise ValueError(f"got boxes for {len(boxes)} images, batch size {pyramid.batch_size}")
        for b, box in enumerate(boxes):
            if box.ndim != 2 or box.shape[-1] != 4 or not box.is_floating_point():
                raise ValueError(f"boxes[{b}] must be float (K, 4), got {tuple(box.shape)}")


def _check_args(
    in_channels: int,
    num_levels: int,
    out_dim: int,
    roi_size: int,
    hidden_dim: int,
    levels: tuple[int, ...],
    fusion: str,
) -> None:
    """Raises ValueError on a non-positive size, bad level indices or an unknown fusion."""
    sizes = dict(in_channels=in_channels, num_levels=num_levels, out_dim=out_dim)
    sizes.update(roi_size=roi_size, hidden_dim=hidden_dim)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be non-empty and unique, got {levels}")
    if not all(0 <= level < num_levels for level in levels):
        raise ValueError(f"levels {levels} must lie in [0, num_levels={num_levels})")
    if fusion not in _FUSIONS:
        raise ValueError(f"fusion must be one of {_FUSIONS}, got {fusion!r}")
