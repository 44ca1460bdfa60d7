"""``ImageTokenizer``: a fixed budget of LLM image tokens from one pyramid level."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from region_proposer.structures import FeaturePyramid

from ..registry import MODELS

MODES = ("pool", "merge")


@MODELS.register_module()
class ImageTokenizer(nn.Module):
    """Turns one level of a ``FeaturePyramid`` into ``grid * grid`` tokens of the LLM's width.

    Each image's *valid* cells (padding excluded, so the aspect ratio is kept) are resampled to a
    fixed grid and projected by an MLP, so the LLM's image-token budget does not depend on the
    high-resolution input size the proposer sees.

    Modes:
        ``pool``: adaptive average pooling to ``grid x grid``, then MLP(C -> D).
        ``merge``: adaptive pooling to ``2 grid x 2 grid``, then 2x2 space-to-depth (Groma's token
        merge: 4 neighbours concatenated, 4C channels), then MLP(4C -> D).

    Args:
        in_channels: Channels of the pyramid level.
        out_dim: LLM hidden size D.
        grid: Tokens per side; the budget is ``grid ** 2``. Defaults to 4.
        mode: ``"pool"`` or ``"merge"``. Defaults to "merge".
        level: Index of the pyramid level to read (negative counts from the end). Defaults to -1
            (the coarsest).
        hidden_dim: Width of the MLP's hidden layer; defaults to ``out_dim``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_dim: int,
        grid: int = 4,
        mode: str = "merge",
        level: int = -1,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ImageTokenizer mode must be one of {MODES}, got {mode!r}")
        if grid < 1 or in_channels < 1 or out_dim < 1:
            raise ValueError(
                f"ImageTokenizer needs grid, in_channels, out_dim >= 1, got {grid}, "
                f"{in_channels}, {out_dim}"
            )
        self.grid = grid
        self.mode = mode
        self.level = level
        merged = in_channels * (4 if mode == "merge" else 1)
        hidden = hidden_dim or out_dim
        self.proj = nn.Sequential(nn.Linear(merged, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    @property
    def num_tokens(self) -> int:
        """G, the image tokens per image."""
        return self.grid * self.grid

    def forward(self, pyramid: FeaturePyramid) -> Tensor:
        """Image tokens for a batch.

        Args:
            pyramid: Features of the padded batch; ``valid_sizes`` (if set) excludes padding.

        Returns:
            (B, G, D) image tokens, row-major over the grid.
        """
        num_levels = len(pyramid.maps)
        if not -num_levels <= self.level < num_levels:
            raise IndexError(
                f"ImageTokenizer level {self.level} outside a {num_levels}-level pyramid"
            )
        fmap = pyramid.maps[self.level]
        stride = pyramid.strides[self.level]
        side = self.grid * (2 if self.mode == "merge" else 1)
        grids = [
            F.adaptive_avg_pool2d(self._valid_cells(fmap[b], pyramid, b, stride), side)
            for b in range(fmap.shape[0])
        ]
        x = torch.stack(grids)  # (B, C, side, side)
        if self.mode == "merge":
            x = F.pixel_unshuffle(x, 2)  # (B, 4C, grid, grid): 2x2 neighbours -> channels
        x = x.flatten(2).transpose(1, 2)  # (B, G, C')
        return self.proj(x)

    @staticmethod
    def _valid_cells(fmap: Tensor, pyramid: FeaturePyramid, index: int, stride: float) -> Tensor:
        """(C, h, w) cells covering image ``index``'s unpadded area (at least one cell)."""
        if pyramid.valid_sizes is None:
            return fmap
        h, w = (int(v) for v in pyramid.valid_sizes[index])
        rows = min(fmap.shape[-2], max(1, math.ceil(h / stride)))
        cols = min(fmap.shape[-1], max(1, math.ceil(w / stride)))
        return fmap[:, :rows, :cols]
