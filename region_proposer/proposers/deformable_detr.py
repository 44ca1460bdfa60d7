"""``DeformableDETRProposer``: Deformable DETR (Zhu et al. 2021) over a ``FeaturePyramid``, with
iterative box refinement and optional two-stage query selection.

Frames: boxes, reference points and two-stage anchors live in the *valid frame*, normalised to
the unpadded image; they are scaled by per-level ``valid_ratios`` only where the deformable
attention samples (see :mod:`region_proposer.layers.pyramid_input`). So the predicted boxes need no
conversion to match ``Proposals``, and an image gives the same proposals alone or padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ..heads import ObjectnessHeads
from ..layers.pyramid_input import (
    FlatPyramid,
    PyramidEmbedding,
    cell_centres,
    check_pyramid,
    padding_masks,
)
from ..layers.set_prediction import (
    LayerPrediction,
    inverse_sigmoid,
    prediction_losses,
    proposals_from_prediction,
    refine_boxes,
)
from ..layers.transformer import MLP, DeformableDecoderLayer, DeformableEncoder, box_sine_embedding
from ..losses import SetCriterion  # noqa: F401  (registers the default criterion type)
from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .base import BaseProposer

__all__ = ["DeformableDETRProposer", "LearnedQueries", "TwoStageQueries", "default_criterion"]


def default_criterion() -> dict:
    """The Deformable DETR loss and matching weights (focal 2, L1 5, GIoU 2)."""
    return dict(
        matcher=dict(type="HungarianMatcher", cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        loss_weights=dict(loss_focal=2.0, loss_l1=5.0, loss_giou=2.0),
    )


def build_criterion(criterion: dict | None) -> nn.Module:
    """``SetCriterion`` (or the registered ``type``) from a config; None -> the default weights."""
    cfg = default_criterion() if criterion is None else dict(criterion)
    cfg.setdefault("type", "SetCriterion")
    return MODELS.build(cfg)


def box_head(embed_dim: int, wh_bias: float) -> MLP:
    """3-layer box-delta MLP whose last layer starts at zero (deltas 0, size logit ``wh_bias``)."""
    head = MLP(in_dim=embed_dim, hidden_dim=embed_dim, out_dim=4, num_layers=3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    nn.init.constant_(head.layers[-1].bias[2:], wh_bias)
    return head


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, S, C) rows picked by index (B, N) -> (B, N, C)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class QueryInit:
    """Initial decoder queries.

    Attributes:
        target: (B, N, D) query content.
        query_pos: (B, N, D) query position embeddings.
        reference: (B, N, 2) points or (B, N, 4) cxcywh boxes in the valid frame.
        valid: (B, N) bool, False where a two-stage query has no valid cell, or None (all valid).
        prediction: Two-stage encoder proposals (the selected top N), or None.
    """

    target: Tensor
    query_pos: Tensor
    reference: Tensor
    valid: Tensor | None = None
    prediction: LayerPrediction | None = None


class LearnedQueries(nn.Module):
    """Learned query content and positions; reference points linear in the positions.

    Args:
        embed_dim: Width D.
        num_queries: Number of queries N.
    """

    def __init__(self, *, embed_dim: int, num_queries: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.query_embed = nn.Embedding(num_queries, 2 * embed_dim)
        self.reference_points = nn.Linear(embed_dim, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    def forward(self, memory: Tensor, flat: FlatPyramid, centres: Tensor) -> QueryInit:
        """Queries for a batch of ``memory.shape[0]`` images (``flat``, ``centres`` unused)."""
        batch = memory.shape[0]
        pos, target = self.query_embed.weight.split(self.embed_dim, dim=-1)
        pos, target = pos.expand(batch, -1, -1), target.expand(batch, -1, -1)
        return QueryInit(
            target=target, query_pos=pos, reference=self.reference_points(pos).sigmoid()
        )


class TwoStageQueries(nn.Module):
    """Two-stage selection: every valid cell proposes a box around an anchor (its centre, size
    ``base_box_size * 2 ** level``); the top N by fused objectness become the reference boxes.

    The encoder loss is applied to the selected N (as DINO), not to every cell.

    Args:
        embed_dim: Width D.
        num_queries: Number of queries N (at most the number of cells).
        objectness: ``ObjectnessHeads`` keyword arguments (besides ``in_dim``).
        base_box_size: Anchor size of the finest level. Defaults to 0.05.
    """

    def __init__(
        self, *, embed_dim: int, num_queries: int, objectness: dict, base_box_size: float = 0.05
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_queries, self.base_box_size = embed_dim, num_queries, base_box_size
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.objectness = ObjectnessHeads(in_dim=embed_dim, **objectness)
        self.box_head = box_head(embed_dim, wh_bias=0.0)
        self.pos_trans = nn.Sequential(
            nn.Linear(2 * embed_dim, 2 * embed_dim), nn.LayerNorm(2 * embed_dim)
        )

    def anchors(self, flat: FlatPyramid, centres: Tensor) -> tuple[Tensor, Tensor]:
        """Anchor logits (B, S, 4) (zero where invalid) and validity (B, S) of every cell."""
        sizes = torch.cat(
            [
                centres.new_full((h * w,), self.base_box_size * 2.0**lvl)
                for lvl, (h, w) in enumerate(flat.shapes)
            ]
        )
        anchors = torch.cat([centres, sizes[None, :, None].expand(*centres.shape[:2], 2)], dim=-1)
        # Deformable DETR drops anchors touching the border and those on padded cells.
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
        if flat.padding_mask is not None:
            valid = valid & ~flat.padding_mask
        return inverse_sigmoid(anchors).masked_fill(~valid[..., None], 0.0), valid

    def forward(self, memory: Tensor, flat: FlatPyramid, centres: Tensor) -> QueryInit:
        """Selects the top-N cells of ``memory`` (B, S, D) as queries."""
        if memory.shape[1] < self.num_queries:
            raise ValueError(
                f"two-stage selection needs at least num_queries={self.num_queries} cells, the "
                f"pyramid has {memory.shape[1]} (shapes {flat.shapes})"
            )
        anchors, valid = self.anchors(flat, centres)
        cells = self.proj(memory.masked_fill(~valid[..., None], 0.0))
        logits = self.objectness(cells)
        score = self.objectness.fuse(logits).detach().masked_fill(~valid, -1.0)
        top = score.topk(self.num_queries, dim=1).indices  # (B, N)
        # Ranking needs only objectness, so boxes are regressed for the selected cells alone.
        box_logits = self.box_head(_gather(cells, top)) + _gather(anchors, top)
        prediction = LayerPrediction(
            logits={name: _gather(value, top) for name, value in logits.items()},
            boxes_cxcywh=box_logits.sigmoid(),
            heads=self.objectness,
        )
        reference = box_logits.detach().sigmoid()
        embedded = box_sine_embedding(reference, num_feats=self.embed_dim // 2).to(memory.dtype)
        pos, target = self.pos_trans(embedded).split(self.embed_dim, dim=-1)
        valid = torch.gather(valid, 1, top)
        return QueryInit(target, pos, reference, valid=valid, prediction=prediction)


@MODELS.register_module()
class DeformableDETRProposer(BaseProposer):
    """Deformable DETR encoder-decoder proposer (the default).

    The pyramid's levels are projected to ``embed_dim`` (GroupNorm over valid cells), encoded by
    deformable self-attention, and decoded by ``num_queries`` queries; each decoder layer predicts
    a box delta on its (inverse-sigmoid) reference box and per-source objectness logits.

    Args:
        in_channels: Channels of every level (int) or of each level.
        embed_dim: Transformer width D. Defaults to 256.
        num_heads: Attention heads. Defaults to 8.
        num_levels: Pyramid levels; defaults to ``len(in_channels)`` or 4 for an int. Checked
            against the pyramid at every forward.
        num_points: Sampling points per head and level. Defaults to 4.
        num_encoder_layers: Defaults to 6.
        num_decoder_layers: Defaults to 6.
        ffn_dim: FFN hidden width. Defaults to 1024.
        dropout: Dropout probability. Defaults to 0.
        num_queries: Proposals N per image. Defaults to 300.
        two_stage: Initial references from the encoder's top-N cells. Defaults to False.
        with_box_refine: Each decoder layer refines the previous layer's boxes (own heads);
            otherwise the references stay fixed and heads are shared. Defaults to True.
        objectness: ``ObjectnessHeads`` arguments (``sources``, ``fusion``). Defaults to one
            ``"default"`` head.
        criterion: ``SetCriterion`` config. Defaults to :func:`default_criterion`.
    """

    def __init__(
        self,
        *,
        in_channels: int | Sequence[int],
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int | None = None,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_queries: int = 300,
        two_stage: bool = False,
        with_box_refine: bool = True,
        objectness: dict | None = None,
        criterion: dict | None = None,
    ) -> None:
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"{type(self).__name__} needs num_decoder_layers >= 1")
        self.in_channels = _per_level(in_channels, num_levels, type(self).__name__)
        self.num_levels, self.num_queries = len(self.in_channels), num_queries
        self.two_stage, self.with_box_refine = two_stage, with_box_refine
        objectness = dict(objectness or {})
        layer_kwargs = dict(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=self.num_levels,
            num_points=num_points,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
        self.embedding = PyramidEmbedding(in_channels=self.in_channels, embed_dim=embed_dim)
        self.encoder = DeformableEncoder(num_layers=num_encoder_layers, **layer_kwargs)
        self.decoder = nn.ModuleList(
            DeformableDecoderLayer(**layer_kwargs) for _ in range(num_decoder_layers)
        )
        num_heads_sets = num_decoder_layers if with_box_refine else 1
        # Without a size in the initial reference (learned points) layer 0 starts at sigmoid(-2).
        self.box_heads = nn.ModuleList(
            box_head(embed_dim, wh_bias=-2.0 if i == 0 and not two_stage else 0.0)
            for i in range(num_heads_sets)
        )
        self.objectness_heads = nn.ModuleList(
            ObjectnessHeads(in_dim=embed_dim, **objectness) for _ in range(num_heads_sets)
        )
        if two_stage:
            self.queries: nn.Module = TwoStageQueries(
                embed_dim=embed_dim, num_queries=num_queries, objectness=objectness
            )
        else:
            self.queries = LearnedQueries(embed_dim=embed_dim, num_queries=num_queries)
        self.criterion = build_criterion(criterion)

    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Proposals (boxes normalised to each unpadded image) for a batch; see the base class."""
        queries, predictions, hidden = self._forward_transformer(feats)
        return proposals_from_prediction(predictions[-1], hidden, queries.valid)

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals and losses: final layer (``loss_*``), decoder layers ``d{i}.loss_*`` and,
        in two-stage, the encoder proposals ``enc.loss_*``."""
        queries, predictions, hidden = self._forward_transformer(feats)
        named = {"": predictions[-1]}
        named.update({f"d{i}.": pred for i, pred in enumerate(predictions[:-1])})
        if queries.prediction is not None:
            named["enc."] = queries.prediction
        losses = prediction_losses(self.criterion, named, instances)
        return proposals_from_prediction(predictions[-1], hidden, queries.valid), losses

    def _forward_transformer(
        self, feats: FeaturePyramid
    ) -> tuple[QueryInit, list[LayerPrediction], Tensor]:
        check_pyramid(
            feats,
            owner=type(self).__name__,
            num_levels=self.num_levels,
            in_channels=self.in_channels,
        )
        flat = self.embedding(feats.maps, padding_masks(feats))
        centres = cell_centres(flat.shapes, flat.valid_ratios)
        memory = self.encoder(
            flat.tokens, flat.pos, centres, flat.valid_ratios, flat.shapes, flat.padding_mask
        )
        queries = self.queries(memory, flat, centres)
        predictions, hidden = self._decode(queries, memory, flat)
        return queries, predictions, hidden

    def _decode(
        self, queries: QueryInit, memory: Tensor, flat: FlatPyramid
    ) -> tuple[list[LayerPrediction], Tensor]:
        """Runs the decoder; returns every layer's prediction and the last (B, N, D) states."""
        hidden, reference = queries.target, queries.reference
        predictions = []
        for i, layer in enumerate(self.decoder):
            hidden = layer(
                hidden,
                queries.query_pos,
                _to_level_frames(reference, flat.valid_ratios),
                memory,
                flat.shapes,
                flat.padding_mask,
            )
            heads = i if self.with_box_refine else 0
            boxes = refine_boxes(self.box_heads[heads](hidden), reference)
            objectness = self.objectness_heads[heads]
            predictions.append(LayerPrediction(objectness(hidden), boxes, objectness))
            if self.with_box_refine:
                reference = boxes.detach()  # the paper stops gradients between layers
        return predictions, hidden


def _to_level_frames(reference: Tensor, valid_ratios: Tensor) -> Tensor:
    """Valid-frame (B, N, 2|4) references -> (B, N, L, 2|4) in each level's padded frame."""
    ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
    return reference[:, :, None] * ratios[:, None]


def _per_level(
    in_channels: int | Sequence[int], num_levels: int | None, owner: str
) -> tuple[int, ...]:
    """Channels per level from an int (``num_levels`` copies, default 4) or a sequence."""
    if isinstance(in_channels, int):
        return (in_channels,) * (4 if num_levels is None else num_levels)
    channels = tuple(int(c) for c in in_channels)
    if not channels or (num_levels is not None and num_levels != len(channels)):
        raise ValueError(
            f"{owner}: in_channels {channels} has {len(channels)} levels, num_levels={num_levels}"
        )
    return channels
