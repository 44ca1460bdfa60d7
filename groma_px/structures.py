"""Contracts of ``groma_px``: ``RegionTokens`` (model-internal), ``GroundedResponse`` (output).

``RegionTokens`` row ``i`` is what the LLM token ``<ri>`` points at, like a hyperlink target.
``GroundedResponse`` is what every inference entry point returns; one parser produces it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from region_proposer.checks import check_leading_dims, check_tensor


class RegionSource(enum.IntEnum):
    """Where a region came from; stored per region in ``RegionTokens.source``."""

    PROPOSER = 0
    USER = 1
    GROUND_TRUTH = 2

    @property
    def label(self) -> str:
        """Lower-case name used in JSON output (``proposer``, ``user``, ``ground_truth``)."""
        return self.name.lower()


_SOURCE_LABELS = {s.label: s for s in RegionSource}
_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class RegionTokens:
    """Region features in the LLM's embedding space, padded to K per image.

    Attributes:
        tokens: (B, K, D_llm) float region features; row ``i`` is the target of ``<ri>``.
        boxes: (B, K, 4) float normalised xyxy of each region in its unpadded image.
        valid: (B, K) bool; False marks padding (no ``<ri>`` exists for that row).
        source: (B, K) integer :class:`RegionSource` codes.
    """

    tokens: Tensor
    boxes: Tensor
    valid: Tensor
    source: Tensor

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_tensor(owner, "tokens", self.tokens, ndim=3, floating=True)
        check_tensor(owner, "boxes", self.boxes, ndim=3, floating=True, last_dim=4)
        check_tensor(owner, "valid", self.valid, ndim=2, dtypes=(torch.bool,))
        check_tensor(owner, "source", self.source, ndim=2, dtypes=_INT)
        check_leading_dims(
            owner,
            "tokens",
            {
                "tokens": self.tokens,
                "boxes": self.boxes,
                "valid": self.valid,
                "source": self.source,
            },
            2,
        )
        codes = {int(s) for s in RegionSource}
        if self.source.numel() and not set(self.source.unique().tolist()) <= codes:
            raise ValueError(
                f"{owner}.source holds codes {sorted(set(self.source.unique().tolist()))}; "
                f"allowed RegionSource codes are {sorted(codes)}"
            )

    @property
    def num_regions(self) -> int:
        """Padded number of regions K per image."""
        return int(self.tokens.shape[1])


@dataclass(frozen=True)
class GroundedRegion:
    """One region of a grounded answer, in original-image pixels.

    Attributes:
        box: Absolute xyxy (x0, y0, x1, y1) in original-image pixels.
        score: Confidence in [0, 1] (1.0 for user regions).
        source: ``"proposer"``, ``"user"`` or ``"ground_truth"``.
        mask: COCO RLE dict (``size``, ``counts``) of the region, or None.
    """

    box: tuple[float, float, float, float]
    score: float
    source: str
    mask: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if len(self.box) != 4 or not all(math.isfinite(float(v)) for v in self.box):
            raise ValueError(f"{owner}.box must be 4 finite numbers, got {self.box}")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{owner}.box must be xyxy with x0 <= x1 and y0 <= y1, got {self.box}")
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"{owner}.score must lie in [0, 1], got {self.score}")
        if self.source not in _SOURCE_LABELS:
            raise ValueError(
                f"{owner}.source must be one of {sorted(_SOURCE_LABELS)}, got {self.source!r}"
            )
        if self.mask is not None and not {"size", "counts"} <= set(self.mask):
            raise ValueError(f"{owner}.mask must be a COCO RLE with 'size' and 'counts'")


@dataclass(frozen=True)
class GroundedSpan:
    """A phrase of the answer text and the regions it points at.

    Attributes:
        start: Character offset of the phrase in ``GroundedResponse.text`` (inclusive).
        end: Character offset (exclusive).
        region_ids: Indices into ``GroundedResponse.regions``.
    """

    start: int
    end: int
    region_ids: tuple[int, ...]


@dataclass(frozen=True)
class GroundedResponse:
    """A grounded answer: plain text whose spans point at regions.

    Attributes:
        text: The answer with grounding markup removed.
        spans: Phrases of ``text`` and the regions each cites.
        regions: The regions cited by any span.
        raw_text: The model's raw output, markup included.
        warnings: What the parser could not interpret (kept as text, never raised).
    """

    text: str
    spans: tuple[GroundedSpan, ...] = ()
    regions: tuple[GroundedRegion, ...] = ()
    raw_text: str = ""
    warnings: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for i, span in enumerate(self.spans):
            if not 0 <= span.start <= span.end <= len(self.text):
                raise ValueError(
                    f"{owner}.spans[{i}] = [{span.start}, {span.end}) lies outside the text "
                    f"(length {len(self.text)})"
                )
            bad = [r for r in span.region_ids if not 0 <= r < len(self.regions)]
            if bad:
                raise ValueError(
                    f"{owner}.spans[{i}] cites regions {bad}, but there are {len(self.regions)}"
                )

    def phrase(self, span_index: int) -> str:
        """The text of span ``span_index``."""
        span = self.spans[span_index]
        return self.text[span.start : span.end]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``tools/chat.py`` prints)."""
        return {
            "text": self.text,
            "raw_text": self.raw_text,
            "spans": [
                {
                    "start": s.start,
                    "end": s.end,
                    "phrase": self.text[s.start : s.end],
                    "regions": list(s.region_ids),
                }
                for s in self.spans
            ],
            "regions": [
                {
                    "box": [float(v) for v in r.box],
                    "score": float(r.score),
                    "source": r.source,
                    "mask": r.mask,
                }
                for r in self.regions
            ],
            "warnings": list(self.warnings),
        }
