"""Mask heads: a mask for each cited region from the shared pyramid (no second image encoder).

``QueryMaskHead`` (Mask2Former / CondInst style): a light pixel decoder fuses the chosen pyramid
levels with a small convolutional stem on the input image into per-pixel embeddings at
``mask_stride``; each region's embedding (its region token, i.e. the RoI feature the LLM read)
is dotted with the pixel embeddings, after the pixels have been told where the region's box is
(relative coordinates, as CondInst's dynamic heads). ``LLMMaskHead`` also conditions on the LLM
hidden state at the cited ``<rK>`` (the state that predicted it), so the answer's context can
refine the mask as LISA's ``[SEG]`` does, through a small two-way attention block (SAM-style:
tokens attend to pixels, pixels attend to tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_px.registry import MODELS
from region_proposer.structures import FeaturePyramid


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.GroupNorm(1, out_ch), nn.GELU()
    )


class TwoWayBlock(nn.Module):
    """Tokens attend to pixels, then pixels attend to tokens (one SAM two-way layer)."""

    def __init__(self, dim: int, num_heads: int = 2) -> None:
        super().__init__()
        self.token_to_pixel = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.pixel_to_token = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_pixels = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, 2 * dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, C) tokens and (N, HW, C) pixels -> both refined."""
        tokens = self.norm_tokens(tokens + self.token_to_pixel(tokens, pixels, pixels)[0])
        tokens = self.norm_mlp(tokens + self.mlp(tokens))
        pixels = self.norm_pixels(pixels + self.pixel_to_token(pixels, tokens, tokens)[0])
        return tokens, pixels


@MODELS.register_module()
class QueryMaskHead(nn.Module):
    """Per-region mask logits from per-pixel embeddings and a region query.

    Pixel decoder: each chosen pyramid level -> 1x1 conv to ``embed_dim``, bilinearly resized to
    ``mask_stride`` and summed with a 2-conv stem on the normalised input image (stride
    ``mask_stride``), then a 3x3 conv. Per region n (image ``b_n``, normalised box, region token
    ``f_n``): the pixel embeddings of ``b_n`` plus an embedding of each pixel's coordinates
    relative to the box (``(x - cx) / w``, ``(y - cy) / h``), a 1x1 conv, then the dot product
    with ``q_n = MLP(f_n)`` (+ a learned bias) gives the logits.

    Args:
        in_channels: Channels of the pyramid levels.
        num_levels: Levels in the pyramid (checked in ``forward``).
        region_dim: Width of the region tokens (the LLM's hidden size).
        embed_dim: Width of the pixel and query embeddings. Defaults to 32.
        levels: Pyramid levels fused into the pixel embeddings. Defaults to (0,) (the finest).
        mask_stride: Input pixels per mask-logit cell (a power of two). Defaults to 4.
        image_stem: Add the convolutional stem on the input image. Defaults to True.
        hidden_dim: Width of the query MLP. Defaults to 256.
    """

    conditions_on_hidden = False

    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        region_dim: int,
        embed_dim: int = 32,
        levels: Sequence[int] = (0,),
        mask_stride: int = 4,
        image_stem: bool = True,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        if not self.levels or not all(0 <= lv < num_levels for lv in self.levels):
            raise ValueError(f"levels {levels} must be non-empty and lie in [0, {num_levels})")
        if mask_stride < 1 or mask_stride & (mask_stride - 1):
            raise ValueError(f"mask_stride must be a power of two, got {mask_stride}")
        self.num_levels = num_levels
        self.mask_stride = mask_stride
        self.embed_dim = embed_dim
        self.level_proj = nn.ModuleList(nn.Conv2d(in_channels, embed_dim, 1) for _ in self.levels)
        self.stem = None
        if image_stem:
            halvings = int(math.log2(mask_stride))
            strides = [2] * halvings or [1]  # one conv per halving, at least one
            channels = [3] + [embed_dim] * len(strides)
            self.stem = nn.Sequential(
                *(_conv(channels[i], embed_dim, s) for i, s in enumerate(strides))
            )
        self.pixel_out = _conv(embed_dim, embed_dim)
        self.rel_embed = nn.Conv2d(2, embed_dim, 1)
        self.region_conv = nn.Sequential(nn.GELU(), nn.Conv2d(embed_dim, embed_dim, 1), nn.GELU())
        self.query = _mlp(region_dim, hidden_dim, embed_dim)
        self.bias = nn.Parameter(torch.zeros(()))

    # ------------------------------------------------------------------ pixel embeddings
    def pixel_embeddings(self, pyramid: FeaturePyramid, image: Tensor) -> Tensor:
        """(B, C, H / s, W / s) per-pixel embeddings of the padded batch."""
        if len(pyramid.maps) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} pyramid levels, got {len(pyramid.maps)}")
        height, width = image.shape[-2:]
        size = (math.ceil(height / self.mask_stride), math.ceil(width / self.mask_stride))
        out = 0
        for proj, level in zip(self.level_proj, self.levels, strict=True):
            fmap = proj(pyramid.maps[level].to(image.dtype))
            out = out + F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
        if self.stem is not None:
            stem = self.stem(image)
            if stem.shape[-2:] != size:
                stem = F.interpolate(stem, size=size, mode="bilinear", align_corners=False)
            out = out + stem
        return self.pixel_out(out)

    # ------------------------------------------------------------------ per-region logits
    def region_pixels(self, pixels: Tensor, batch_index: Tensor, boxes: Tensor, image_hw) -> Tensor:
        """(N, C, h, w) pixel embeddings of each region's image with its relative coordinates.

        Args:
            pixels: (B, C, h, w) from :meth:`pixel_embeddings`.
            batch_index: (N,) image of each region.
            boxes: (N, 4) absolute xyxy of each region in padded-input pixels.
            image_hw: (H, W) of the padded input.
        """
        _, _, h, w = pixels.shape
        height, width = image_hw
        ys = (torch.arange(h, device=pixels.device, dtype=pixels.dtype) + 0.5) * (height / h)
        xs = (torch.arange(w, device=pixels.device, dtype=pixels.dtype) + 0.5) * (width / w)
        boxes = boxes.to(pixels.dtype)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
        rel_x = (xs[None, :] - cx[:, None]) / bw[:, None]  # (N, w)
        rel_y = (ys[None, :] - cy[:, None]) / bh[:, None]  # (N, h)
        rel = torch.stack(
            [rel_x[:, None, :].expand(-1, h, -1), rel_y[:, :, None].expand(-1, -1, w)], dim=1
        )
        return self.region_conv(pixels[batch_index] + self.rel_embed(rel))

    def refine(
        self, region_pix: Tensor, region_feats: Tensor, hidden: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(N, C) queries and the (N, C, h, w) pixel embeddings they are dotted with: here the
        region token's MLP and the pixels unchanged."""
        return self.query(region_feats), region_pix

    def forward(
        self,
        pixels: Tensor,
        batch_index: Tensor,
        boxes: Tensor,
        region_feats: Tensor,
        image_hw: tuple[int, int],
        hidden: Tensor | None = None,
    ) -> Tensor:
        """Mask logits of N regions.

        Args:
            pixels: (B, C, h, w) from :meth:`pixel_embeddings`.
            batch_index: (N,) long image of each region.
            boxes: (N, 4) absolute xyxy in padded-input pixels.
            region_feats: (N, D) the regions' tokens.
            image_hw: (H, W) of the padded input.
            hidden: (N, D) LLM hidden states that predicted each cited ``<rK>``; required by
                heads with ``conditions_on_hidden``.

        Returns:
            (N, h, w) logits at ``mask_stride`` over the padded input.
        """
        if self.conditions_on_hidden and hidden is None:
            raise ValueError(f"{type(self).__name__} needs the LLM hidden state of each cited <rK>")
        if len(batch_index) == 0:  # still in the graph of every parameter (DDP)
            touch = sum(p.sum() for p in self.parameters()) + pixels.sum()
            return pixels.new_zeros(0, *pixels.shape[-2:]) + 0 * touch
        region_pix = self.region_pixels(pixels, batch_index, boxes, image_hw)
        dtype = pixels.dtype
        query, region_pix = self.refine(
            region_pix, region_feats.to(dtype), None if hidden is None else hidden.to(dtype)
        )
        logits = torch.einsum("nc,nchw->nhw", query, region_pix)
        return logits / math.sqrt(self.embed_dim) + self.bias


@MODELS.register_module()
class LLMMaskHead(QueryMaskHead):
    """``QueryMaskHead`` conditioned also on the LLM hidden state at the cited ``<rK>``.

    Tokens ``[MLP(f_n), MLP(h_n)]`` and the region's pixel embeddings go through
    ``refine_layers`` two-way attention blocks; the mask query is the sum of the refined tokens.

    Args:
        refine_layers: Two-way attention blocks. Defaults to 1.
        num_heads: Attention heads. Defaults to 2.
        **kwargs: ``QueryMaskHead`` arguments.
    """

    conditions_on_hidden = True

    def __init__(self, *, refine_layers: int = 1, num_heads: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        region_dim = self.query[0].in_features
        hidden_dim = self.query[0].out_features
        self.hidden_query = _mlp(region_dim, hidden_dim, self.embed_dim)
        self.blocks = nn.ModuleList(
            TwoWayBlock(self.embed_dim, num_heads) for _ in range(refine_layers)
        )

    def refine(
        self, region_pix: Tensor, region_feats: Tensor, hidden: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Tokens [region query, hidden query] and the pixels through the two-way blocks; the
        query is the sum of the refined tokens."""
        n, c, h, w = region_pix.shape
        tokens = torch.stack([self.query(region_feats), self.hidden_query(hidden)], dim=1)
        flat = region_pix.flatten(2).transpose(1, 2)  # (N, hw, C)
        for block in self.blocks:
            tokens, flat = block(tokens, flat)
        return tokens.sum(1), flat.transpose(1, 2).reshape(n, c, h, w)
