"""COCO RLE masks of the record format: encoding, a strict parser of compressed counts, decoding.

pycocotools parses compressed RLE strings without checking them: counts that do not add up to
``height * width`` give a garbage area, and decoding them writes past the mask buffer (pycocotools
2.0.11, ``rleDecode`` has no bounds check). :func:`rle_counts` re-implements ``rleFrString``
(``maskApi.c``) in numpy and :func:`decode_rle` refuses any RLE whose runs do not tile the image
exactly, before pycocotools touches it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

#: Characters of pycocotools' compressed counts: "0" + 6-bit groups.
_FIRST_CHAR, _NUM_CHARS = 48, 64
#: A count of < 2**32 (pycocotools' ``uint``) takes at most 7 characters of 5 payload bits.
_MAX_CHARS_PER_COUNT = 7


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a (H, W) bool mask, with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), checked.

    Each run is a little-endian sequence of 5-bit groups (bit 0x20 of a character: more follow;
    bit 0x10 of the last one: negative); from the fourth run on, the stored value is the
    difference to the run two before.

    Args:
        counts: The compressed string (str or ASCII bytes).

    Returns:
        (R,) int64 run lengths, alternating background and foreground, background first.

    Raises:
        ValueError: On a character outside ``"0"``..``"o"``, a run cut off at the end of the
            string, an over-long run or a negative run length.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        raise ValueError("counts holds non-ASCII characters") from None
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - _FIRST_CHAR
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() >= _NUM_CHARS:
        raise ValueError("counts holds characters outside the RLE alphabet '0'..'o'")
    last = (chars & 0x20) == 0  # the character that ends its run
    if not last[-1]:
        raise ValueError("counts ends inside a run (truncated string)")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_COUNT:
        raise ValueError(f"counts holds a run of more than {_MAX_CHARS_PER_COUNT} characters")
    position = np.arange(chars.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (1 << (5 * lengths)), values)
    # Runs 3, 5, ... and 4, 6, ... are stored as differences to the run two before.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        raise ValueError("counts decodes to a negative run length")
    return runs


def check_rle(rle: Any, height: int | None = None, width: int | None = None) -> int:
    """Checks a COCO RLE dict and returns its area (foreground pixels).

    Args:
        rle: ``{"size": [h, w], "counts": str | bytes}``.
        height: Height the mask must have, or None to accept any.
        width: Width the mask must have, or None to accept any.

    Returns:
        The number of foreground pixels.

    Raises:
        ValueError: If ``rle`` is not such a dict, its size differs from ``(height, width)`` or
            its runs do not cover the ``h * w`` pixels exactly.
    """
    if not isinstance(rle, dict) or not {"size", "counts"} <= set(rle):
        raise ValueError("must be a COCO RLE object with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)
    ):
        raise ValueError(f"size must be [height, width], got {size!r}")
    h, w = int(size[0]), int(size[1])
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"size [{h}, {w}] != image [height, width] [{height}, {width}]")
    if not isinstance(rle["counts"], (str, bytes)):
        raise ValueError("counts must be a compressed RLE string (pycocotools)")
    runs = rle_counts(rle["counts"])
    if int(runs.sum()) != h * w:
        raise ValueError(f"counts cover {int(runs.sum())} pixels, not height * width = {h * w}")
    return int(runs[1::2].sum())


def decode_rle(rle: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decodes a COCO RLE dict after :func:`check_rle`.

    Args:
        rle: ``{"size": [h, w], "counts": str | bytes}``.
        height: Height the mask must have, or None to accept any.
        width: Width the mask must have, or None to accept any.

    Returns:
        (h, w) uint8 mask, 1 on the foreground.

    Raises:
        ValueError: As :func:`check_rle`.
    """
    check_rle(rle, height, width)
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [int(v) for v in rle["size"]], "counts": counts})
