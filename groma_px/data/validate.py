"""Checks one grounded-conversation record (see ``schema.py``); errors name the field.

``GroundedConversationDataset`` and ``tools/validate_data.py`` wrap these errors with the file and
line of the record, so a bad record is reported as ``train.jsonl:17: regions[2].box: ...``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from PIL import Image

from .masks import check_rle
from .schema import (
    ASSISTANT,
    HUMAN,
    IMAGE_PLACEHOLDER,
    REQUIRED_FIELDS,
    ROLES,
    TASKS,
    count_region_placeholders,
)

OPTIONAL_FIELDS = ("meta",)
REGION_FIELDS = ("box", "category", "mask", "attributes", "prompt", "point")
PROMPT_KINDS = ("box", "point", "mask")
TURN_FIELDS = ("from", "value", "regions")
IMAGE_CHECKS = ("decode", "exists", "none")


class RecordFieldError(ValueError):
    """A record field is invalid. ``field`` is a path such as ``regions[2].box``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RecordError(ValueError):
    """A record of a JSONL file is invalid; names the file, the 1-based line and the field."""

    def __init__(self, file: str | Path, line: int, field: str, message: str) -> None:
        super().__init__(f"{file}:{line}: {field}: {message}")
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=4096)
def _mask_area(counts: str, height: int, width: int) -> int | str:
    """Area of the RLE ``{"size": [height, width], "counts": counts}``, or why it is invalid.

    Cached: every record of an image repeats the image's masks, and records of one image are
    adjacent in a file (checking one costs ~80 us, measured on the synthetic masks).
    """
    try:
        return check_rle({"size": [height, width], "counts": counts}, height, width)
    except ValueError as exc:
        return str(exc)


class RecordValidator:
    """Validates records of one data root.

    Args:
        data_root: Directory that record ``image`` paths are relative to.
        check_images: ``"decode"`` opens and decodes every image once (and checks its size),
            ``"exists"`` only checks the file exists, ``"none"`` skips image checks.
            Defaults to ``"decode"``.
    """

    def __init__(self, data_root: str | Path, *, check_images: str = "decode") -> None:
        if check_images not in IMAGE_CHECKS:
            raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
        self.data_root = Path(data_root)
        self.check_images = check_images
        self._image_sizes: dict[Path, tuple[int, int] | RecordFieldError] = {}

    def __call__(self, record: Any) -> None:
        """Raises :class:`RecordFieldError` for the first invalid field of ``record``."""
        if not isinstance(record, dict):
            raise RecordFieldError(
                "<record>", f"must be a JSON object, got {type(record).__name__}"
            )
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise RecordFieldError(missing[0], "required field is missing")
        unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise RecordFieldError(unknown[0], "unknown field (put extra data under 'meta')")
        self._check_header(record)
        for i, region in enumerate(record["regions"]):
            self._check_region(f"regions[{i}]", region, record["width"], record["height"])
        self._check_conversations(record["conversations"], len(record["regions"]))
        if "meta" in record and not isinstance(record["meta"], dict):
            raise RecordFieldError("meta", "must be a JSON object")

    def _check_header(self, record: dict[str, Any]) -> None:
        for name in ("id", "image", "source"):
            if not isinstance(record[name], str) or not record[name]:
                raise RecordFieldError(name, f"must be a non-empty string, got {record[name]!r}")
        for name in ("height", "width"):
            if not _is_int(record[name]) or record[name] <= 0:
                raise RecordFieldError(name, f"must be a positive integer, got {record[name]!r}")
        if record["task"] not in TASKS:
            raise RecordFieldError("task", f"unknown task {record['task']!r}; known: {TASKS}")
        if not isinstance(record["regions"], list):
            raise RecordFieldError("regions", "must be a list")
        if self.check_images != "none":
            self._check_image(record["image"], record["width"], record["height"])

    def _check_image(self, rel_path: str, width: int, height: int) -> None:
        path = self.data_root / rel_path
        if path not in self._image_sizes:
            self._image_sizes[path] = self._probe_image(path)
        probed = self._image_sizes[path]
        if isinstance(probed, RecordFieldError):
            raise probed
        if self.check_images == "decode" and probed != (width, height):
            raise RecordFieldError(
                "width/height",
                f"record says {width}x{height} but image {path} is {probed[0]}x{probed[1]}",
            )

    def _probe_image(self, path: Path) -> tuple[int, int] | RecordFieldError:
        if not path.is_file():
            return RecordFieldError("image", f"file not found: {path}")
        if self.check_images == "exists":
            return (0, 0)
        try:
            with Image.open(path) as img:
                img.load()
                return img.size
        except Exception as exc:  # PIL raises several types for corrupt data
            return RecordFieldError("image", f"cannot decode {path}: {type(exc).__name__}: {exc}")

    def _check_region(self, name: str, region: Any, width: int, height: int) -> None:
        if not isinstance(region, dict):
            raise RecordFieldError(name, "must be a JSON object")
        unknown = sorted(set(region) - set(REGION_FIELDS))
        if unknown:
            raise RecordFieldError(f"{name}.{unknown[0]}", "unknown region field")
        box = region.get("box")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise RecordFieldError(
                f"{name}.box", f"must be 4 finite numbers [x0, y0, x1, y1], got {box!r}"
            )
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise RecordFieldError(f"{name}.box", f"degenerate box {box} (zero or negative area)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise RecordFieldError(
                f"{name}.box", f"box {box} lies outside the image (width={width}, height={height})"
            )
        if "category" in region and not isinstance(region["category"], str):
            raise RecordFieldError(f"{name}.category", "must be a string")
        if "mask" in region:
            self._check_mask(f"{name}.mask", region["mask"], width, height)
        self._check_prompt(name, region, width, height)

    @staticmethod
    def _check_prompt(name: str, region: dict, width: int, height: int) -> None:
        """``prompt`` (how a human turn gives the region): box (default), point (needs
        ``point`` [x, y] inside the image) or mask (needs ``mask``)."""
        kind = region.get("prompt", "box")
        if kind not in PROMPT_KINDS:
            raise RecordFieldError(f"{name}.prompt", f"must be one of {PROMPT_KINDS}, got {kind!r}")
        point = region.get("point")
        if kind == "point" or point is not None:
            if not isinstance(point, list) or len(point) != 2 or not all(map(_is_number, point)):
                raise RecordFieldError(f"{name}.point", f"must be [x, y] numbers, got {point!r}")
            if not (0 <= point[0] < width and 0 <= point[1] < height):
                raise RecordFieldError(
                    f"{name}.point",
                    f"point {point} lies outside the image (width={width}, height={height})",
                )
        if kind == "mask" and "mask" not in region:
            raise RecordFieldError(f"{name}.prompt", "a mask prompt needs the region's 'mask'")

    @staticmethod
    def _check_mask(name: str, rle: Any, width: int, height: int) -> None:
        """A region mask is a compressed COCO RLE of the image's size, decodable and non-empty.

        An empty mask is an error, not a warning: a region has a box of positive area, and a
        region with no visible pixels (say, a fully occluded object with an amodal box) is
        written without ``mask``, which tells losses and metrics to skip its mask.
        """
        if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
            raise RecordFieldError(name, "must be a COCO RLE object with 'size' and 'counts'")
        if not isinstance(rle["counts"], str):
            raise RecordFieldError(name, "counts must be a compressed RLE string (pycocotools)")
        size = rle["size"]
        if not isinstance(size, list) or not all(map(_is_int, size)) or size != [height, width]:
            raise RecordFieldError(
                name, f"size {size!r} != image [height, width] {[height, width]}"
            )
        area = _mask_area(rle["counts"], height, width)
        if isinstance(area, str):
            raise RecordFieldError(name, area)
        if area == 0:
            raise RecordFieldError(
                name, "empty mask; leave 'mask' out for a region with no visible pixels"
            )

    def _check_conversations(self, turns: Any, num_regions: int) -> None:
        if not isinstance(turns, list) or not turns:
            raise RecordFieldError("conversations", "must be a non-empty list of turns")
        num_images = 0
        for i, turn in enumerate(turns):
            name = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise RecordFieldError(name, "must be a JSON object")
            unknown = sorted(set(turn) - set(TURN_FIELDS))
            if unknown:
                raise RecordFieldError(f"{name}.{unknown[0]}", "unknown turn field")
            expected_role = ROLES[i % 2]
            if turn.get("from") != expected_role:
                raise RecordFieldError(
                    f"{name}.from",
                    f"expected {expected_role!r} (turns alternate {HUMAN!r}, "
                    f"{ASSISTANT!r}), got {turn.get('from')!r}",
                )
            value = turn.get("value")
            if not isinstance(value, str):
                raise RecordFieldError(f"{name}.value", "must be a string")
            num_images += value.count(IMAGE_PLACEHOLDER)
            self._check_citations(name, turn, value, num_regions)
        if num_images != 1 or IMAGE_PLACEHOLDER not in turns[0]["value"]:
            raise RecordFieldError(
                "conversations",
                f"need exactly one {IMAGE_PLACEHOLDER} in the first human turn, "
                f"found {num_images} in the conversation",
            )

    @staticmethod
    def _check_citations(name: str, turn: dict[str, Any], value: str, num_regions: int) -> None:
        cited = turn.get("regions", [])
        if not isinstance(cited, list) or not all(_is_int(r) for r in cited):
            raise RecordFieldError(f"{name}.regions", f"must be a list of integers, got {cited!r}")
        num_placeholders = count_region_placeholders(value)
        if num_placeholders != len(cited):
            raise RecordFieldError(
                f"{name}.regions",
                f"{num_placeholders} placeholders in the text but {len(cited)} cited regions",
            )
        bad = [r for r in cited if not 0 <= r < num_regions]
        if bad:
            raise RecordFieldError(
                f"{name}.regions", f"cites regions {bad}, but the record has {num_regions}"
            )
