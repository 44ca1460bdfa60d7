"""Region-text alignment: an auxiliary loss that names every labelled region of a training image.

A referring question trains the region pointer on one region per sample. The records of a
detection-style dataset name every region (``category``, attributes), so each training image
can also supply one query per labelled region: the region's own words (a random subset of them,
like the short descriptions people use), scored by the pointer's phrase query against every
kept region's feature key, with the kept regions the words describe as positives (multi-positive
InfoNCE, as GLIP / MDETR align phrases with boxes). It trains exactly the term of the pointer
that matches a phrase to a region feature, with several labels per image instead of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


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
            Defaults to "image".
    """

    weight: float = 1.0
    drop_prob: float = 0.5
    noun: str = "object"
    prefix: str = "the"
    iou_thr: float = 0.5
    negatives: str = "image"

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"region_text_loss.weight must be > 0, got {self.weight}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"region_text_loss.drop_prob must be in [0, 1), got {self.drop_prob}")
        if not 0.0 < self.iou_thr <= 1.0:
            raise ValueError(f"region_text_loss.iou_thr must be in (0, 1], got {self.iou_thr}")
        if self.negatives not in ("image", "batch"):
            raise ValueError(
                f"region_text_loss.negatives must be 'image' or 'batch', got {self.negatives!r}"
            )

    def queries(
        self,
        labels: Sequence[Sequence[str | None]],
        match: Tensor,
        generator: torch.Generator | None = None,
    ) -> list[tuple[str, list[int]]]:
        """One query per record region that some kept region covers.

        Args:
            labels: Per record region, its label tuple (None where a field is missing).
            match: (K,) record region each kept region covers, -1 for none
                (:func:`match_regions`).
            generator: Random stream for the field subsets. Defaults to torch's global one.

        Returns:
            ``(text, positive kept rows)`` per query: the rows whose record region has every
            field the query names with the same value (the region itself and any look-alike).
        """
        return [
            (text, positive_rows(labels, match, named))
            for text, named in self.draw(labels, match, generator)
        ]

    def draw(
        self,
        labels: Sequence[Sequence[str | None]],
        match: Tensor,
        generator: torch.Generator | None = None,
    ) -> list[tuple[str, dict[int, str]]]:
        """``(text, {field index: value})`` of one query per covered record region (the fields
        it names), as :meth:`queries` draws them."""
        covered = sorted({int(m) for m in match.tolist() if m >= 0})
        out = []
        for m in covered:
            if not 0 <= m < len(labels):
                raise ValueError(f"kept region matches record region {m}; got {len(labels)} labels")
            named = [f for f, value in enumerate(labels[m]) if value is not None]
            if not named:
                continue
            keep = torch.rand(len(named), generator=generator) >= self.drop_prob
            if not keep.any():
                keep[torch.randint(len(named), (1,), generator=generator)] = True
            fields = [f for f, k in zip(named, keep.tolist(), strict=True) if k]
            noun_field = len(labels[m]) - 1
            words = [labels[m][f] for f in fields if f != noun_field]
            noun = labels[m][noun_field] if noun_field in fields else self.noun
            text = " ".join([*([self.prefix] if self.prefix else []), *words, noun])
            out.append((text, {f: labels[m][f] for f in fields}))
        return out


def positive_rows(
    labels: Sequence[Sequence[str | None]], match: Tensor, named: dict[int, str]
) -> list[int]:
    """Kept rows whose record region (``match``) has every ``named`` field's value."""
    return [
        k
        for k, r in enumerate(match.tolist())
        if r >= 0 and all(labels[r][f] == value for f, value in named.items())
    ]


def batch_queries(
    align: RegionTextAlignment,
    matched: Sequence[tuple[Sequence[Sequence[str | None]], Tensor]],
    generator: torch.Generator | None = None,
) -> tuple[list[str], list[int], list[list[int]]]:
    """The region-text queries of a batch.

    Args:
        align: How queries are drawn and what they compete over (``negatives``).
        matched: Per image, ``(labels, match)`` as :meth:`RegionTextAlignment.queries` takes them.
        generator: Random stream for the field subsets. Defaults to torch's global one.

    Returns:
        ``texts``, the image each query comes from, and each query's positive rows: rows of its
        own image (``negatives="image"``), or rows of the kept regions of all images in batch
        order, those of every image whose record region has the named values (``"batch"``).
    """
    starts = [0]
    for _, match in matched:
        starts.append(starts[-1] + len(match))
    texts, image_index, positives = [], [], []
    for b, (labels, match) in enumerate(matched):
        for text, named in align.draw(labels, match, generator):
            texts.append(text)
            image_index.append(b)
            if align.negatives == "image":
                positives.append(positive_rows(labels, match, named))
            else:
                positives.append(
                    [
                        starts[c] + k
                        for c, (other, other_match) in enumerate(matched)
                        for k in positive_rows(other, other_match, named)
                    ]
                )
    return texts, image_index, positives


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
