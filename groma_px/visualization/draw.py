"""Draws regions (box, optional RLE mask, label) on an image; used by previews and ``chat.py``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from region_proposer.visualization import draw_regions

from ..data.schema import ASSISTANT, PLACEHOLDER_PATTERN
from ..structures import GroundedResponse

_PHRASE_SPAN = re.compile(r"<p>(.*?)</p>\s*<roi>(.*?)</roi>", flags=re.S)


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
