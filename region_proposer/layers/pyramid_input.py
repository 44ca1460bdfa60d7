"""From a ``FeaturePyramid`` to transformer inputs: checks, padding masks, projection, flattening.

Coordinate frames (see ``docs/proposers.md``): a level of a padded batch has ``(H_l, W_l)`` cells
covering the padded image; image ``b`` occupies its first ``ceil(h_b * H_l / H)`` rows and
``ceil(w_b * W_l / W)`` columns (its *valid cells*). ``valid_ratios[b, l] = (valid columns / W_l,
valid rows / H_l)``. Proposers predict in the *valid frame*, fractions of the valid cells, which is
the unpadded image; multiplying by ``valid_ratios`` gives the level's padded frame that
:class:`~region_proposer.layers.MSDeformAttn` samples in. Valid cells do not depend on padding, so
an image gives the same features, positions and sampling points alone or padded in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..structures import FeaturePyramid
from .transformer import SinePositionEmbedding

__all__ = [
    "FlatPyramid",
    "PyramidEmbedding",
    "cell_centres",
    "check_pyramid",
    "masked_group_norm",
    "padding_masks",
]


def check_pyramid(
    feats: FeaturePyramid, *, owner: str, num_levels: int | None, in_channels: Sequence[int] | None
) -> None:
    """Raises a ValueError naming the level if the pyramid does not fit the model or is not finite.

    Args:
        feats: The input pyramid.
        owner: Model name for the messages.
        num_levels: Levels the model was built for, or None for any.
        in_channels: Channels per level the model was built for, or None for any.
    """
    if num_levels is not None and len(feats.maps) != num_levels:
        raise ValueError(
            f"{owner} was built for {num_levels} feature levels but the FeaturePyramid has "
            f"{len(feats.maps)} (strides {feats.strides}); set num_levels / in_channels in the "
            "proposer config to the backbone's pyramid"
        )
    if in_channels is not None and tuple(in_channels) != feats.channels:
        raise ValueError(
            f"{owner} expects channels {tuple(in_channels)} per level, got {feats.channels}"
        )
    # One device sync for all levels; only on failure find which one.
    finite = torch.stack([torch.isfinite(fmap).all() for fmap in feats.maps])
    if not bool(finite.all()):
        level = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"{owner}: feats.maps[{level}] (level {level}, stride {feats.strides[level]:g}) "
            "contains NaN or Inf values"
        )


def padding_masks(feats: FeaturePyramid) -> list[Tensor] | None:
    """Per level, (B, H_l, W_l) bool, True at cells outside each image's valid cells.

    Returns:
        None when ``feats.valid_sizes`` is None (no image is padded).
    """
    if feats.valid_sizes is None:
        return None
    device = feats.valid_sizes.device
    image = torch.tensor(feats.image_size, device=device)
    masks = []
    for fmap in feats.maps:
        height, width = fmap.shape[-2:]
        # ceil(valid * cells / pixels) in integers: exact, unlike dividing by a float stride
        cells = feats.valid_sizes.long() * torch.tensor([height, width], device=device) + image - 1
        cells = cells // image  # (B, 2) valid rows, columns
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        mask = (rows[None, :, None] >= cells[:, 0, None, None]) | (
            cols[None, None, :] >= cells[:, 1, None, None]
        )
        masks.append(mask.to(fmap.device))
    return masks


def masked_group_norm(x: Tensor, valid: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm with statistics over valid cells only; padded cells come out as zero.

    Args:
        x: (B, C, H, W) features.
        valid: (B, H, W) bool, True at valid cells.
        norm: The GroupNorm whose groups, eps and affine parameters are used.

    Returns:
        (B, C, H, W) normalised features.
    """
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    grouped = x.reshape(batch, groups, -1, height * width)
    weight = valid.reshape(batch, 1, 1, height * width).to(x.dtype)
    count = weight.sum(-1, keepdim=True).clamp(min=1.0) * grouped.shape[2]
    mean = (grouped * weight).sum((-1, -2), keepdim=True) / count
    var = (((grouped - mean) * weight) ** 2).sum((-1, -2), keepdim=True) / count
    out = ((grouped - mean) * torch.rsqrt(var + norm.eps)).view_as(x)
    if norm.affine:
        out = out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return out * valid[:, None].to(x.dtype)


def cell_centres(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Centres of all cells of all levels in the valid frame.

    Args:
        shapes: (H_l, W_l) per level.
        valid_ratios: (B, L, 2) (x, y) valid fraction of each level.

    Returns:
        (B, S, 2) (x, y) centres; valid cells lie in (0, 1), padded cells beyond 1.
    """
    centres = []
    for level, (height, width) in enumerate(shapes):
        ys = (
            torch.arange(height, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5
        ) / height
        xs = (
            torch.arange(width, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5
        ) / width
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).view(1, -1, 2)
        centres.append(grid / valid_ratios[:, None, level])
    return torch.cat(centres, dim=1)


@dataclass(frozen=True)
class FlatPyramid:
    """Projected levels flattened into one token sequence (level-major, row-major).

    Attributes:
        tokens: (B, S, D) projected features, S = sum_l H_l * W_l.
        pos: (B, S, D) sine position (+ level) embeddings.
        padding_mask: (B, S) bool, True at padded cells, or None without padding.
        shapes: (H_l, W_l) per level.
        valid_ratios: (B, L, 2) float32 (x, y) valid fraction of each level (ones without
            padding).
    """

    tokens: Tensor
    pos: Tensor
    padding_mask: Tensor | None
    shapes: list[tuple[int, int]]
    valid_ratios: Tensor


class PyramidEmbedding(nn.Module):
    """Per level: 1x1 conv to ``embed_dim`` + GroupNorm (over valid cells); sine positions;
    optionally a learned level embedding; then all levels flattened into one sequence.

    Args:
        in_channels: Channels C_l of each level this module embeds.
        embed_dim: Output width D. Defaults to 256.
        level_embed: Add a learned embedding per level to the positions. Defaults to True.
        num_groups: GroupNorm groups (must divide ``embed_dim``). Defaults to
            ``gcd(32, embed_dim)`` (32 for the usual widths).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        level_embed: bool = True,
        num_groups: int | None = None,
    ) -> None:
        super().__init__()
        groups = num_groups or math.gcd(32, embed_dim)
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.norm = nn.ModuleList(nn.GroupNorm(groups, embed_dim) for _ in in_channels)
        self.position = SinePositionEmbedding(num_feats=embed_dim // 2)
        self.level_embed = (
            nn.Parameter(torch.empty(len(in_channels), embed_dim)) if level_embed else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier projections with zero bias (Deformable DETR), normal level embeddings."""
        for conv in self.proj:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def forward(self, maps: Sequence[Tensor], masks: Sequence[Tensor] | None) -> FlatPyramid:
        """Embeds and flattens the levels.

        Args:
            maps: One (B, C_l, H_l, W_l) map per level.
            masks: One (B, H_l, W_l) bool padding mask per level (True = padded), or None.

        Returns:
            The flattened pyramid.
        """
        levels = [
            self._embed_level(level, fmap, None if masks is None else masks[level])
            for level, fmap in enumerate(maps)
        ]
        tokens, pos, flat_masks, ratios = zip(*levels, strict=True)
        return FlatPyramid(
            tokens=torch.cat(tokens, 1),
            pos=torch.cat(pos, 1),
            padding_mask=None if masks is None else torch.cat(flat_masks, 1),
            shapes=[(int(m.shape[-2]), int(m.shape[-1])) for m in maps],
            valid_ratios=torch.stack(ratios, 1),  # float32 also under autocast: positions
        )

    def _embed_level(
        self, level: int, fmap: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Tokens (B, HW, D), positions (B, HW, D), padding mask (B, HW), valid ratio (B, 2)."""
        projected = self.proj[level](fmap)
        if mask is None:
            embedded = self.norm[level](projected)
            mask = torch.zeros(
                fmap.shape[0], *fmap.shape[-2:], dtype=torch.bool, device=fmap.device
            )
        else:
            embedded = masked_group_norm(projected, ~mask, self.norm[level])
        # (B, D, H, W) -> (B, H*W, D)
        pos = self.position(mask).to(embedded.dtype).flatten(2).transpose(1, 2)
        if self.level_embed is not None:
            pos = pos + self.level_embed[level]
        return embedded.flatten(2).transpose(1, 2), pos, mask.flatten(1), _valid_ratio(mask)


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2) (x, y) fraction of valid columns and rows."""
    _, height, width = mask.shape
    valid = ~mask
    rows = valid[:, :, 0].sum(1).float() / height
    cols = valid[:, 0, :].sum(1).float() / width
    return torch.stack([cols, rows], dim=-1)
