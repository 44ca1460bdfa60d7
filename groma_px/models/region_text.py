"""Region-text alignment: an auxiliary loss that names every labelled region of a training image.

A referring question trains the region pointer on one region per sample. The records of a
detection-style dataset name every region (``category``, attributes), so each training image
can also supply one query per labelled region: the region's own words (a random subset of them,
like the short descriptions people use), scored by the pointer's phrase query against every
kept region's feature key, with the kept regions the words describe as positives (multi-positive
InfoNCE, as GLIP / MDETR align phrases with boxes). It trains exactly the term of the pointer
that matches a phrase to a region feature, with several labels per image instead of one.

With ``relational_prob`` some regions get a second query that relates them to another labelled
region of the image ("the star to the left of the red circle", the spatial rules of
:mod:`groma_px.data.synthetic.expressions`): the positives are the kept regions whose record
region stands in that relation to a region the anchor words name, and the pointer's relation
head scores them, so the relational term learns from every image instead of from the few
relational questions a dataset asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..data.synthetic.expressions import RELATION_PHRASES, RELATIONS, relation_holds

Labels = Sequence[Sequence[str | None]]


class Query(NamedTuple):
    """One region-text query: its words, the label fields it names (``{field index: value}``)
    and, for a relational query, ``(relation, anchor's named fields)``."""

    text: str
    named: dict[int, str]
    relation: tuple[str, dict[int, str]] | None = None


def match_regions(gt_boxes: Tensor, kept_boxes: Tensor, iou_thr: float) -> Tensor:
    """(K,) long index of the record region each kept region covers (best IoU >= ``iou_thr``),
    -1 for none. Boxes are xyxy in the same frame."""
    if gt_boxes.numel() == 0 or kept_boxes.numel() == 0:
        return torch.full((kept_boxes.shape[0],), -1, dtype=torch.long, device=kept_boxes.device)
    best, index = box_iou(gt_boxes, kept_boxes).max(dim=0)
    return torch.where(best >= iou_thr, index, torch.full_like(index, -1))


@dataclass(frozen=True)
class RegionTextAlignment:
    """How the region-text queries are drawn (``GromaPX(region_text_loss=dict(...))``).

    Labels are the tuples ``PackGroundedChatInputs(region_label_fields=...)`` packs, fields in
    phrase order with the noun last (``("attributes.size", "attributes.color", "category")``).

    Args:
        weight: Weight of ``loss_region_text``. Defaults to 1.0.
        drop_prob: Chance that each named field is left out of a query (at least one stays), so
            that queries range from "the star" to "the small red star". Defaults to 0.5.
        noun: Noun of a query whose noun field is left out or missing ("the red object").
            Defaults to "object".
        prefix: Words before the query's words, as the answers' phrases start. Defaults to
            "the".
        iou_thr: A kept region stands for the record region it overlaps best at this IoU or
            more. Defaults to 0.5.
        negatives: ``"image"``: a query competes over the kept regions of its own image (as the
            pointer chooses at inference); ``"batch"``: over every kept region of the batch, the
            positives being all those, in any image, whose record region has the named values
            (so "the circle" must beat every hexagon of the batch, not only its image's).
            Relational queries always compete over their own image's regions (the relation is
            to an anchor there). Defaults to "image".
        relational_prob: Chance that a region also gets a second query that relates it to
            another covered region of its image ("the <words> to the left of the <anchor
            words>"; the relation is drawn among those that hold, the anchor's words until they
            name it alone; none when no anchor can be named alone); needs the record boxes and
            a pointer with a relation head. Defaults to 0.0 (none).
    """

    weight: float = 1.0
    drop_prob: float = 0.5
    noun: str = "object"
    prefix: str = "the"
    iou_thr: float = 0.5
    negatives: str = "image"
    relational_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"region_text_loss.weight must be > 0, got {self.weight}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"region_text_loss.drop_prob must be in [0, 1), got {self.drop_prob}")
        if not 0.0 < self.iou_thr <= 1.0:
            raise ValueError(f"region_text_loss.iou_thr must be in (0, 1], got {self.iou_thr}")
        if not 0.0 <= self.relational_prob <= 1.0:
            raise ValueError(
                f"region_text_loss.relational_prob must be in [0, 1], got {self.relational_prob}"
            )
        if self.negatives not in ("image", "batch"):
            raise ValueError(
                f"region_text_loss.negatives must be 'image' or 'batch', got {self.negatives!r}"
            )

    def queries(
        self,
        labels: Labels,
        match: Tensor,
        generator: torch.Generator | None = None,
        boxes: Tensor | None = None,
    ) -> list[tuple[str, list[int]]]:
        """One query per record region that some kept region covers (and, at
        ``relational_prob``, a relational one).

        Args:
            labels: Per record region, its label tuple (None where a field is missing).
            match: (K,) record region each kept region covers, -1 for none
                (:func:`match_regions`).
            generator: Random stream for the field subsets. Defaults to torch's global one.
            boxes: (M, 4) xyxy record boxes (any frame that keeps left/right and up/down),
                needed for relational queries.

        Returns:
            ``(text, positive kept rows)`` per query: the rows whose record region has every
            field the query names with the same value (the region itself and any look-alike)
            and, for a relational query, stands in the relation to a region the anchor names.
        """
        return [
            (query.text, positive_rows(labels, match, query.named, query.relation, boxes))
            for query in self.draw(labels, match, generator, boxes)
        ]

    def draw(
        self,
        labels: Labels,
        match: Tensor,
        generator: torch.Generator | None = None,
        boxes: Tensor | None = None,
    ) -> list[Query]:
        """One :class:`Query` per covered record region (and a relational one at
        ``relational_prob``), as :meth:`queries` draws them."""
        covered = sorted({int(m) for m in match.tolist() if m >= 0})
        for m in covered:
            if not 0 <= m < len(labels):
                raise ValueError(f"kept region matches record region {m}; got {len(labels)} labels")
        if self.relational_prob > 0 and boxes is None:
            raise ValueError("region_text_loss.relational_prob > 0 needs the record boxes")
        out = []
        for m in covered:
            named = self._fields(labels[m], generator)
            if not named:
                continue
            text = self._words(labels[m], named)
            out.append(Query(text, named))
            if self.relational_prob > 0 and self._coin(generator) < self.relational_prob:
                relation = self._relation(labels, boxes, m, covered, generator)
                if relation is not None:
                    anchor = next(a for a in covered if a != m and _accepts(labels[a], relation[1]))
                    phrase = RELATION_PHRASES[relation[0]]
                    words = self._words(labels[anchor], relation[1])
                    out.append(Query(f"{text} {phrase} {words}", named, relation))
        return out

    @staticmethod
    def _coin(generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    def _fields(
        self, label: Sequence[str | None], generator: torch.Generator | None
    ) -> dict[int, str]:
        """A random non-empty subset of the region's named fields (each dropped at
        ``drop_prob``)."""
        named = [f for f, value in enumerate(label) if value is not None]
        if not named:
            return {}
        keep = torch.rand(len(named), generator=generator) >= self.drop_prob
        if not keep.any():
            keep[torch.randint(len(named), (1,), generator=generator)] = True
        return {f: label[f] for f, k in zip(named, keep.tolist(), strict=True) if k}

    def _words(self, label: Sequence[str | None], named: dict[int, str]) -> str:
        """ "the small red star", "the red object": the named fields, the noun last."""
        noun_field = len(label) - 1
        words = [value for f, value in named.items() if f != noun_field]
        noun = named.get(noun_field, self.noun)
        return " ".join([*([self.prefix] if self.prefix else []), *words, noun])

    def _relation(
        self,
        labels: Labels,
        boxes: Tensor,
        target: int,
        covered: list[int],
        generator: torch.Generator | None,
    ) -> tuple[str, dict[int, str]] | None:
        """A relation that holds from ``target`` to another covered region, and words that
        name that anchor alone among the record regions (a random subset, else all its
        fields); None when there is none."""
        rows = boxes.tolist()
        pairs = [
            (relation, a)
            for a in covered
            if a != target
            for relation in RELATIONS
            if relation_holds(relation, rows[target], rows[a])
        ]
        if not pairs:
            return None
        relation, anchor = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        full = {f: v for f, v in enumerate(labels[anchor]) if v is not None}
        for named in (self._fields(labels[anchor], generator), full):
            if named and sum(_accepts(label, named) for label in labels) == 1:
                return relation, named
        return None


def _accepts(label: Sequence[str | None], named: dict[int, str]) -> bool:
    return all(label[f] == value for f, value in named.items())


def positive_rows(
    labels: Labels,
    match: Tensor,
    named: dict[int, str],
    relation: tuple[str, dict[int, str]] | None = None,
    boxes: Tensor | None = None,
) -> list[int]:
    """Kept rows whose record region (``match``) has every ``named`` field's value and, with a
    ``relation`` (and the record ``boxes``), stands in it to another record region the anchor's
    fields name."""
    accepted = [_accepts(label, named) for label in labels]
    if relation is not None:
        if boxes is None:
            raise ValueError("a relational query needs the record boxes")
        kind, anchor_named = relation
        rows = boxes.tolist()
        anchors = [a for a, label in enumerate(labels) if _accepts(label, anchor_named)]
        accepted = [
            ok and any(a != r and relation_holds(kind, rows[r], rows[a]) for a in anchors)
            for r, ok in enumerate(accepted)
        ]
    return [k for k, r in enumerate(match.tolist()) if r >= 0 and accepted[r]]


class BatchQueries(NamedTuple):
    """The region-text queries of a batch (:func:`batch_queries`)."""

    texts: list[str]
    image_index: list[int]
    positives: list[list[int]]
    relational: list[bool]


def batch_queries(
    align: RegionTextAlignment,
    matched: Sequence[tuple[Labels, Tensor] | tuple[Labels, Tensor, Tensor]],
    generator: torch.Generator | None = None,
) -> BatchQueries:
    """The region-text queries of a batch.

    Args:
        align: How queries are drawn and what they compete over (``negatives``).
        matched: Per image, ``(labels, match)`` or ``(labels, match, record boxes)`` as
            :meth:`RegionTextAlignment.queries` takes them (boxes for relational queries).
        generator: Random stream for the field subsets. Defaults to torch's global one.

    Returns:
        ``texts``, the image each query comes from, each query's positive rows and whether it is
        relational. Rows are of its own image (``negatives="image"``), or of the kept regions
        of all images in batch order (``"batch"``): those of every image whose record region
        has the named values, or for a relational query those of its own image.
    """
    starts = [0]
    for item in matched:
        starts.append(starts[-1] + len(item[1]))
    out = BatchQueries([], [], [], [])
    for b, (labels, match, *rest) in enumerate(matched):
        boxes = rest[0] if rest else None
        for query in align.draw(labels, match, generator, boxes):
            out.texts.append(query.text)
            out.image_index.append(b)
            out.relational.append(query.relation is not None)
            own = positive_rows(labels, match, query.named, query.relation, boxes)
            if align.negatives == "image":
                out.positives.append(own)
            elif query.relation is not None:
                out.positives.append([starts[b] + k for k in own])
            else:
                out.positives.append(
                    [
                        starts[c] + k
                        for c, (other, other_match, *_) in enumerate(matched)
                        for k in positive_rows(other, other_match, query.named)
                    ]
                )
    return out


def multi_positive_nce(
    scores: Tensor, valid: Tensor, positive: Tensor, count: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean over queries of ``-log(sum_pos softmax(scores))`` over each query's valid columns,
    and the share of queries whose best column is a positive.

    Args:
        scores: (Q, K) float.
        valid: (Q, K) bool, the columns a query competes over.
        positive: (Q, K) bool, a non-empty subset of ``valid`` per query.
        count: What to divide the summed loss by instead of Q (e.g. the mean of Q over
            data-parallel ranks, so that averaged gradients are those of the global batch).
    """
    if not bool((positive & valid).any(-1).all()):
        raise ValueError("every query needs a valid positive column")
    low = torch.finfo(scores.dtype).min
    everything = torch.logsumexp(scores.masked_fill(~valid, low), dim=-1)
    positives = torch.logsumexp(scores.masked_fill(~(positive & valid), low), dim=-1)
    best = scores.masked_fill(~valid, low).argmax(dim=-1, keepdim=True)
    accuracy = positive.gather(-1, best).float().mean()
    total = (everything - positives).sum()
    count = scores.new_tensor(float(len(scores))) if count is None else count
    return total / count.clamp(min=1.0), accuracy
