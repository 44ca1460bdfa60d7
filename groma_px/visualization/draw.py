"""Draws regions (box, optional RLE mask, label) on an image; used by previews and ``chat.py``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from ..data.schema import ASSISTANT, PLACEHOLDER_PATTERN
from ..structures import GroundedResponse

# Distinct, saturated colours (Tableau 10) cycled over regions.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_PHRASE_SPAN = re.compile(r"<p>(.*?)</p>\s*<roi>(.*?)</roi>", flags=re.S)


def _decode_mask(rle: dict[str, Any]) -> np.ndarray:
    counts = rle["counts"]
    counts = counts.encode() if isinstance(counts, str) else counts
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def draw_regions(
    image: Image.Image | np.ndarray,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str] | None = None,
    masks: Sequence[dict[str, Any] | None] | None = None,
    *,
    line_width: int = 2,
    mask_alpha: float = 0.3,
) -> Image.Image:
    """Draws boxes (absolute xyxy pixels), optional masks and labels on a copy of ``image``.

    Args:
        image: RGB image (PIL or HxWx3 uint8 array).
        boxes: One absolute xyxy box per region.
        labels: One label per region, drawn at the box's top-left corner. Defaults to none.
        masks: One COCO RLE (or None) per region, blended in the region's colour.
        line_width: Box outline width in pixels.
        mask_alpha: Opacity of the mask overlay.

    Returns:
        A new RGB ``PIL.Image``.
    """
    canvas = np.array(
        Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    )
    canvas = canvas.astype(np.float32)
    for i, rle in enumerate(masks or ()):
        if rle is not None:
            m = _decode_mask(rle)
            canvas[m] = (1 - mask_alpha) * canvas[m] + mask_alpha * np.array(
                PALETTE[i % len(PALETTE)]
            )
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, box in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=line_width)
        if labels is not None and labels[i]:
            tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), labels[i], font=font)
            top = y0 - (ty1 - ty0) - 2 if y0 >= (ty1 - ty0) + 2 else y0
            draw.rectangle([tx0, top, tx1 + 2, top + (ty1 - ty0) + 2], fill=colour)
            draw.text((x0 + 1, top), labels[i], fill=(255, 255, 255), font=font)
    return out


def draw_response(image: Image.Image | np.ndarray, response: GroundedResponse) -> Image.Image:
    """Draws every region a grounded answer cites, labelled by the phrase that cites it."""
    labels = [f"r{i}" for i in range(len(response.regions))]
    for span_index, span in enumerate(response.spans):
        for region_id in span.region_ids:
            labels[region_id] = response.phrase(span_index)
    return draw_regions(
        image,
        [r.box for r in response.regions],
        labels,
        [r.mask for r in response.regions],
    )


def _record_labels(record: dict[str, Any]) -> dict[int, str]:
    """Region index -> phrase for regions cited by ``<p>phrase</p><roi>...</roi>`` in answers."""
    labels: dict[int, str] = {}
    for turn in record["conversations"]:
        cited = list(turn.get("regions", []))
        if turn["from"] != ASSISTANT:
            continue
        position = 0  # placeholders consumed so far in this turn
        cursor = 0
        for match in _PHRASE_SPAN.finditer(turn["value"]):
            position += len(PLACEHOLDER_PATTERN.findall(turn["value"], cursor, match.start()))
            num_inside = len(PLACEHOLDER_PATTERN.findall(match.group(2)))
            for region in cited[position : position + num_inside]:
                labels.setdefault(region, match.group(1))
            position += num_inside
            cursor = match.end()
    return labels


def add_caption(
    image: Image.Image, lines: Sequence[str], *, width_chars: int | None = None
) -> Image.Image:
    """Returns ``image`` with ``lines`` of text in a white band underneath (long lines wrap)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    char_w = max(1, probe.textbbox((0, 0), "x" * 10, font=font)[2] // 10)
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    chars = width_chars or max(20, (image.width - 8) // char_w)
    wrapped = [text[i : i + chars] for text in lines for i in range(0, max(1, len(text)), chars)]
    out = Image.new("RGB", (image.width, image.height + line_h * len(wrapped) + 6), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(wrapped):
        draw.text((4, image.height + 3 + i * line_h), text, fill=(0, 0, 0), font=font)
    return out


def draw_record(
    record: dict[str, Any], data_root: str | Path, *, all_regions: bool = False
) -> Image.Image:
    """Draws the regions a record's conversation cites, labelled by phrase (else by category),
    with the conversation written underneath.

    Args:
        record: A record in the unified format.
        data_root: Directory the record's image path is relative to.
        all_regions: Draw every region of the record, not only the cited ones.
    """
    image = Image.open(Path(data_root) / record["image"]).convert("RGB")
    cited = sorted({r for turn in record["conversations"] for r in turn.get("regions", [])})
    shown = range(len(record["regions"])) if all_regions else cited
    phrases = _record_labels(record)
    regions = [record["regions"][i] for i in shown]
    labels = [
        phrases.get(i, regions[k].get("category", f"region {i}")) for k, i in enumerate(shown)
    ]
    drawn = draw_regions(
        image, [r["box"] for r in regions], labels, [r.get("mask") for r in regions]
    )
    lines = [
        f"{turn['from']}: {turn['value']}".replace("\n", " ") for turn in record["conversations"]
    ]
    return add_caption(drawn, [f"[{record['task']}] {record['id']}", *lines])
