"""Transformer layers of the DETR-style proposers: sine embeddings, deformable encoder and decoder
layers (Zhu et al. 2021), the plain DETR decoder layer (Carion et al. 2020), and the box MLP.

All layers are post-norm (residual, then LayerNorm), as in both papers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn

__all__ = [
    "DETRDecoderLayer",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "FFN",
    "MLP",
    "SinePositionEmbedding",
    "box_sine_embedding",
]


def _sine(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """(...,) coordinates (already scaled) -> (..., num_feats) interleaved sin / cos features."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """DETR's 2-D sine position embedding, normalised to each image's valid extent.

    Row and column indices count valid cells only (cumulative sums of the un-padded mask), so a
    cell gets the same embedding whether its image is padded in a batch or not.

    Args:
        num_feats: Features per axis; the output has ``2 * num_feats`` channels (y then x).
            Defaults to 128.
        temperature: Frequency base. Defaults to 10000.
        scale: Range of the normalised coordinates. Defaults to 2 * pi.
    """

    def __init__(
        self, *, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, padding_mask: Tensor) -> Tensor:
        """Embeds cell positions.

        Args:
            padding_mask: (B, H, W) bool, True at padded cells.

        Returns:
            (B, 2 * num_feats, H, W) float32 embeddings.
        """
        valid = (~padding_mask).float()
        y_embed, x_embed = valid.cumsum(1), valid.cumsum(2)
        # cell centres ((i + 0.5) / n) of the valid extent, as Deformable DETR
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * self.scale
        pos_y = _sine(y_embed, self.num_feats, self.temperature)
        pos_x = _sine(x_embed, self.num_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, *, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of boxes, for two-stage query positions.

    Args:
        boxes: (B, N, 4) boxes with coordinates in [0, 1].
        num_feats: Features per coordinate.
        temperature: Frequency base. Defaults to 10000.

    Returns:
        (B, N, 4 * num_feats) float32 embeddings.
    """
    return _sine(boxes * (2 * math.pi), num_feats, temperature).flatten(-2)


class FFN(nn.Module):
    """Post-norm feed-forward block: ``norm(x + dropout(W2 dropout(relu(W1 x))))``.

    Args:
        embed_dim: Width D.
        ffn_dim: Hidden width.
        dropout: Dropout probability. Defaults to 0.
    """

    def __init__(self, *, embed_dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, embed_dim),
            nn.Dropout(dropout),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.norm(x + self.layers(x))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head).

    Args:
        in_dim: Input width.
        hidden_dim: Hidden width.
        out_dim: Output width.
        num_layers: Number of linear layers. Defaults to 3.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _self_attention(attn: nn.MultiheadAttention, x: Tensor, pos: Tensor) -> Tensor:
    """Self-attention with the position added to queries and keys, not to values."""
    query = x + pos
    return attn(query, query, x, need_weights=False)[0]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all cells of all levels, then an FFN.

    Args:
        embed_dim: Width D. Defaults to 256.
        num_heads: Attention heads. Defaults to 8.
        num_levels: Feature levels. Defaults to 4.
        num_points: Sampling points per head and level. Defaults to 4.
        ffn_dim: FFN hidden width. Defaults to 1024.
        dropout: Dropout probability. Defaults to 0.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """(B, S, D) tokens + (B, S, D) positions, (B, S, L, 2) padded-frame points -> (B, S, D)."""
        attended = self.self_attn(x + pos, reference_points, x, shapes, padding_mask)
        return self.ffn(self.norm(x + self.dropout(attended)))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`; each cell's reference point is its centre.

    Args:
        num_layers: Number of layers.
        **layer_kwargs: Keyword arguments of :class:`DeformableEncoderLayer`.
    """

    def __init__(self, *, num_layers: int, **layer_kwargs: int | float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        centres: Tensor,
        valid_ratios: Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Encodes the flattened pyramid.

        Args:
            x: (B, S, D) tokens.
            pos: (B, S, D) position embeddings.
            centres: (B, S, 2) cell centres in the valid frame.
            valid_ratios: (B, L, 2) (x, y) valid fraction per level.
            shapes: (H_l, W_l) per level.
            padding_mask: (B, S) bool, True at padded cells, or None.

        Returns:
            (B, S, D) encoded tokens.
        """
        # valid frame -> each level's padded frame: (B, S, 1, 2) * (B, 1, L, 2)
        reference_points = centres[:, :, None] * valid_ratios[:, None]
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes, padding_mask)
        return x


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the encoded pyramid, then an FFN.

    Args: as :class:`DeformableEncoderLayer`.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MSDeformAttn(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Updates the queries.

        Args:
            x: (B, N, D) queries.
            query_pos: (B, N, D) query position embeddings.
            reference_points: (B, N, L, 2|4) points or boxes in each level's padded frame.
            memory: (B, S, D) encoded tokens.
            shapes: (H_l, W_l) per level.
            padding_mask: (B, S) bool, True at padded cells, or None.

        Returns:
            (B, N, D) updated queries.
        """
        x = self.norm1(x + self.dropout(_self_attention(self.self_attn, x, query_pos)))
        attended = self.cross_attn(x + query_pos, reference_points, memory, shapes, padding_mask)
        x = self.norm2(x + self.dropout(attended))
        return self.ffn(x)


class DETRDecoderLayer(nn.Module):
    """DETR decoder layer: query self-attention, global cross-attention to one level, FFN.

    Args:
        embed_dim: Width D. Defaults to 256.
        num_heads: Attention heads. Defaults to 8.
        ffn_dim: FFN hidden width. Defaults to 1024.
        dropout: Dropout probability. Defaults to 0.
    """

    def __init__(
        self, *, embed_dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(embed_dim=embed_dim, ffn_dim=ffn_dim, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Updates the queries.

        Args:
            x: (B, N, D) queries.
            query_pos: (B, N, D) query position embeddings.
            memory: (B, S, D) tokens of the level.
            memory_pos: (B, S, D) their position embeddings (added to keys only).
            padding_mask: (B, S) bool, True at padded cells (ignored as keys), or None.

        Returns:
            (B, N, D) updated queries.
        """
        x = self.norm1(x + self.dropout(_self_attention(self.self_attn, x, query_pos)))
        attended = self.cross_attn(
            x + query_pos,
            memory + memory_pos,
            memory,
            key_padding_mask=padding_mask,
            need_weights=False,
        )[0]
        x = self.norm2(x + self.dropout(attended))
        return self.ffn(x)
