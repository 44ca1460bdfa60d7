"""``DETRProposer``: a plain DETR decoder (Carion et al. 2020) over one pyramid level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ..heads import ObjectnessHeads
from ..layers.pyramid_input import PyramidEmbedding, check_pyramid, padding_masks
from ..layers.set_prediction import LayerPrediction, prediction_losses, proposals_from_prediction
from ..layers.transformer import MLP, DETRDecoderLayer
from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .base import BaseProposer
from .deformable_detr import build_criterion

__all__ = ["DETRProposer"]


@MODELS.register_module()
class DETRProposer(BaseProposer):
    """Learned queries decode one level with global attention; no encoder (the backbone's
    features are already contextual). Boxes are ``sigmoid(MLP)`` cxcywh in the valid frame (the
    unpadded image): positions are normalised to each image's valid cells and padded cells are
    masked keys, so an image gives the same proposals alone or padded.

    Args:
        in_channels: Channels of the levels (int), or of each level.
        embed_dim: Width D. Defaults to 256.
        num_heads: Attention heads. Defaults to 8.
        num_decoder_layers: Defaults to 6.
        ffn_dim: FFN hidden width. Defaults to 1024.
        dropout: Dropout probability. Defaults to 0.
        num_queries: Proposals N per image. Defaults to 100.
        level: Index of the level to decode (negative counts from the coarsest). Defaults to
            None: the finest level with ``H * W <= max_tokens`` (the coarsest if none fits),
            chosen per batch; then all levels must share one channel count.
        max_tokens: Token budget of the automatic level choice. Defaults to 1024.
        objectness: ``ObjectnessHeads`` arguments. Defaults to one ``"default"`` head.
        criterion: ``SetCriterion`` config. Defaults to the Deformable DETR weights.
    """

    def __init__(
        self,
        *,
        in_channels: int | Sequence[int],
        embed_dim: int = 256,
        num_heads: int = 8,
        num_decoder_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_queries: int = 100,
        level: int | None = None,
        max_tokens: int = 1024,
        objectness: dict | None = None,
        criterion: dict | None = None,
    ) -> None:
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(
                f"DETRProposer needs num_decoder_layers >= 1, got {num_decoder_layers}"
            )
        self.level, self.max_tokens = level, max_tokens
        self.in_channels = None if isinstance(in_channels, int) else tuple(in_channels)
        channels = self._level_channels(in_channels, level)
        self.embedding = PyramidEmbedding(
            in_channels=[channels], embed_dim=embed_dim, level_embed=False
        )
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        self.decoder = nn.ModuleList(
            DETRDecoderLayer(
                embed_dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout
            )
            for _ in range(num_decoder_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)  # shared by all layers' outputs, as DETR
        self.box_head = MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
        self.objectness = ObjectnessHeads(in_dim=embed_dim, **(objectness or {}))
        self.criterion = build_criterion(criterion)

    @staticmethod
    def _level_channels(in_channels: int | Sequence[int], level: int | None) -> int:
        if isinstance(in_channels, int):
            return in_channels
        channels = [int(c) for c in in_channels]
        if level is not None:
            return channels[level]
        if len(set(channels)) != 1:
            raise ValueError(
                f"DETRProposer: levels have different channels {channels}; set level= to pick one"
            )
        return channels[0]

    def select_level(self, feats: FeaturePyramid) -> int:
        """Index of the level this model decodes for ``feats`` (see ``level`` / ``max_tokens``)."""
        num_levels = len(feats.maps)
        if self.level is not None:
            if not -num_levels <= self.level < num_levels:
                raise ValueError(
                    f"DETRProposer: level={self.level} but the pyramid has {num_levels}"
                )
            return self.level % num_levels
        sizes = [int(m.shape[-2] * m.shape[-1]) for m in feats.maps]
        fitting = [i for i, size in enumerate(sizes) if size <= self.max_tokens]
        if not fitting:
            return min(range(num_levels), key=sizes.__getitem__)
        return max(fitting, key=sizes.__getitem__)

    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Proposals (boxes normalised to each unpadded image) for a batch; see the base class."""
        predictions, hidden = self._forward_transformer(feats)
        return proposals_from_prediction(predictions[-1], hidden)

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals and losses: final layer (``loss_*``) and decoder layers ``d{i}.loss_*``."""
        predictions, hidden = self._forward_transformer(feats)
        named = {"": predictions[-1]}
        named.update({f"d{i}.": pred for i, pred in enumerate(predictions[:-1])})
        losses = prediction_losses(self.criterion, named, instances)
        return proposals_from_prediction(predictions[-1], hidden), losses

    def _forward_transformer(self, feats: FeaturePyramid) -> tuple[list[LayerPrediction], Tensor]:
        owner = type(self).__name__
        num_levels = None if self.in_channels is None else len(self.in_channels)
        check_pyramid(feats, owner=owner, num_levels=num_levels, in_channels=self.in_channels)
        level = self.select_level(feats)
        expected = self.embedding.proj[0].in_channels
        if feats.channels[level] != expected:
            raise ValueError(
                f"{owner} expects {expected} channels, feats.maps[{level}] has "
                f"{feats.channels[level]}"
            )
        masks = padding_masks(feats)
        flat = self.embedding([feats.maps[level]], None if masks is None else [masks[level]])
        query_pos = self.query_embed.weight.expand(feats.batch_size, -1, -1)
        hidden = torch.zeros_like(query_pos)  # DETR: content starts empty, positions are learned
        predictions = []
        for layer in self.decoder:
            hidden = layer(hidden, query_pos, flat.tokens, flat.pos, flat.padding_mask)
            normed = self.norm(hidden)
            boxes = self.box_head(normed).sigmoid()
            predictions.append(LayerPrediction(self.objectness(normed), boxes, self.objectness))
        return predictions, normed
