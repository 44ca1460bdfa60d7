"""``GroundedChat``: ask a trained ``GromaPX`` about an image; answers are ``GroundedResponse``."""

from __future__ import annotations

import itertools
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.registry import DefaultScope
from PIL import Image
from pycocotools import mask as mask_utils

from ..data.schema import (
    ASSISTANT,
    HUMAN,
    IMAGE_PLACEHOLDER,
    REFER_BOX,
    REGION_PLACEHOLDERS,
    count_region_placeholders,
)
from ..region_encoder.prompts import mask_box
from ..structures import GroundedResponse
from .export import load_exported

ImageLike = str | Path | np.ndarray | Image.Image
_PROMPT_ONLY = re.compile(
    "|".join(re.escape(t) for t in (IMAGE_PLACEHOLDER, "<region>", *REGION_PLACEHOLDERS))
)


@dataclass
class Conversation:
    """One image, a fixed set of user regions, and the turns so far.

    The region set the LLM sees is fixed within a conversation: user regions are given when the
    conversation starts, and every turn checks that selection kept the same regions.
    """

    image_path: str
    width: int
    height: int
    regions: list[dict[str, Any]]
    turns: list[dict[str, Any]] = field(default_factory=list)
    kept_boxes: torch.Tensor | None = None
    responses: list[GroundedResponse] = field(default_factory=list)


class GroundedChat:
    """Inference front end of ``GromaPX``.

    Example::

        chat = GroundedChat.from_pretrained("work_dirs/quickstart/model")
        answer = chat.chat("scene.png", "[grounding] Where is the red star?")
        answer.spans, answer.regions  # phrases and the boxes they point at (original pixels)

    Args:
        model: A built ``GromaPX`` in eval mode.
        pipeline: Its test pipeline config (``PackGroundedChatInputs`` in predict mode last).
    """

    def __init__(self, model: torch.nn.Module, pipeline: list[dict]) -> None:
        self.model = model.eval()
        with DefaultScope.overwrite_default_scope("groma_px"):
            self.pipeline = Compose(pipeline)
        self._tmp = tempfile.TemporaryDirectory(prefix="groma_px_chat_")
        self._num_images = itertools.count()  # names array images' files (ids get reused)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu") -> GroundedChat:
        """Loads a directory written by ``export_pretrained`` (safetensors weights)."""
        model, pipeline = load_exported(directory)
        return cls(model.to(device), pipeline)

    def start(self, image: ImageLike, regions: list[dict[str, Any]] | None = None) -> Conversation:
        """A new conversation about ``image`` with user regions (visual prompts), each one of
        ``{"box": [x0, y0, x1, y1]}``, ``{"point": (x, y)}`` or ``{"mask": array or RLE}`` in
        original-image pixels. A point snaps to the best proposal containing it; a mask's
        region is its tight box, mask-pooled (``RoIRegionEncoder``)."""
        path, width, height = self._image_file(image)
        checked = [_check_region(r, i, width, height) for i, r in enumerate(regions or [])]
        top_k = self.model.selector.top_k
        if len(checked) > top_k:
            raise ValueError(
                f"{len(checked)} user regions but the model has only {top_k} region slots"
            )
        return Conversation(path, width, height, checked)

    def chat(
        self,
        image: ImageLike | Conversation,
        text: str,
        regions: list[dict[str, Any]] | None = None,
    ) -> GroundedResponse:
        """Answers ``text`` about ``image``; pass a ``Conversation`` to continue one.

        The text cites user regions with ``<refer_box>`` (in order); if it cites none, the
        regions are appended as ``<roi><refer_box>...</roi>`` at the end of the first turn.
        """
        conv = image if isinstance(image, Conversation) else self.start(image, regions)
        if isinstance(image, Conversation) and regions:
            raise ValueError("a conversation's regions are fixed: start a new one to add regions")
        response = self._answer(conv, self._human_turn(conv, text))
        return response

    def _human_turn(self, conv: Conversation, text: str) -> dict[str, Any]:
        first = not conv.turns
        cited = count_region_placeholders(text)
        if first and conv.regions and cited == 0:
            text = f"{text} <roi>{REFER_BOX * len(conv.regions)}</roi>"
            cited = len(conv.regions)
        if cited and (not first or cited != len(conv.regions)):
            raise ValueError(
                f"the text cites {cited} regions with placeholders but the conversation has "
                f"{len(conv.regions)} user regions (cite them in the first turn, in order)"
            )
        if first and IMAGE_PLACEHOLDER not in text:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        refs = list(range(len(conv.regions))) if cited else []
        return {"from": HUMAN, "value": text, "regions": refs}

    def _answer(self, conv: Conversation, turn: dict[str, Any]) -> GroundedResponse:
        turns = [*conv.turns, turn, {"from": ASSISTANT, "value": "", "regions": []}]
        record = {
            "id": f"chat/{len(conv.turns) // 2}",
            "image": conv.image_path,
            "img_path": conv.image_path,
            "height": conv.height,
            "width": conv.width,
            "task": "conversation",
            "source": "chat",
            "regions": conv.regions,
            "conversations": turns,
            "meta": {},
        }
        batch = pseudo_collate([self.pipeline(record)])
        with torch.no_grad():
            data = self.model.data_preprocessor(batch, False)
            (sample,) = self.model(**data, mode="predict")
        if conv.kept_boxes is not None and not torch.equal(conv.kept_boxes, sample.kept_boxes):
            raise RuntimeError("the region set changed within a conversation")
        conv.kept_boxes = sample.kept_boxes
        response = sample.pred_response
        conv.turns = [
            *conv.turns,
            turn,
            {"from": ASSISTANT, "value": _replayable(response.raw_text), "regions": []},
        ]
        conv.responses.append(response)
        return response

    def _image_file(self, image: ImageLike) -> tuple[str, int, int]:
        """A readable image file for the pipeline, and its (width, height)."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path}")
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except Exception as exc:
                raise ValueError(f"cannot decode image {path}: {exc}") from exc
            return str(path), width, height
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        path = Path(self._tmp.name) / f"image_{next(self._num_images)}.png"
        pil.convert("RGB").save(path)
        return str(path), pil.width, pil.height


def _replayable(raw_text: str) -> str:
    """The answer as it goes back into the next turn's prompt: ``<ri>`` citations stay (the
    region set is fixed), tokens that only the prompt builder may place are dropped."""
    return _PROMPT_ONLY.sub("", raw_text)


def _check_region(region: dict[str, Any], index: int, width: int, height: int) -> dict[str, Any]:
    kinds = [k for k in ("box", "point", "mask") if isinstance(region, dict) and k in region]
    if len(kinds) != 1:
        raise ValueError(
            f"regions[{index}] must be a dict with exactly one of 'box' [x0, y0, x1, y1], "
            f"'point' (x, y) or 'mask' (HxW array or COCO RLE), got {region!r:.80}"
        )
    if kinds[0] == "point":
        return _check_point(region["point"], index, width, height)
    if kinds[0] == "mask":
        return _check_mask(region["mask"], index, width, height)
    box = [float(v) for v in region["box"]]
    if len(box) != 4 or not np.all(np.isfinite(box)):
        raise ValueError(f"regions[{index}].box must be 4 finite numbers, got {region['box']}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"regions[{index}].box {box} must satisfy 0 <= x0 < x1 <= {width} and "
            f"0 <= y0 < y1 <= {height} (original-image pixels, xyxy)"
        )
    return {"box": box}


def _check_point(point: Any, index: int, width: int, height: int) -> dict[str, Any]:
    xy = [float(v) for v in np.asarray(point, dtype=float).reshape(-1)]
    if len(xy) != 2 or not np.all(np.isfinite(xy)):
        raise ValueError(f"regions[{index}].point must be 2 finite numbers (x, y), got {point}")
    x, y = xy
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(
            f"regions[{index}].point {xy} lies outside the {width}x{height} image "
            "(original-image pixels)"
        )
    # A one-pixel placeholder box; the model snaps the point to a proposal.
    box = [x - 0.5, y - 0.5, x + 0.5, y + 0.5]
    box = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)]
    return {"box": box, "point": xy, "prompt": "point"}


def _check_mask(mask: Any, index: int, width: int, height: int) -> dict[str, Any]:
    if isinstance(mask, dict):
        if list(mask.get("size", [])) != [height, width]:
            raise ValueError(
                f"regions[{index}].mask RLE has size {mask.get('size')}, the image is "
                f"[{height}, {width}] (height, width)"
            )
        try:
            array = mask_utils.decode(mask)
        except Exception as exc:
            raise ValueError(f"regions[{index}].mask is not a decodable COCO RLE: {exc}") from exc
    else:
        array = np.asarray(mask)
        if array.shape != (height, width):
            raise ValueError(
                f"regions[{index}].mask has shape {array.shape}, the image is ({height}, {width})"
            )
    binary = np.asfortranarray(array.astype(bool).astype(np.uint8))
    if not binary.any():
        raise ValueError(f"regions[{index}].mask is empty")
    box = [float(v) for v in mask_box(torch.from_numpy(binary.astype(bool))).tolist()]
    rle = mask_utils.encode(binary)
    rle["counts"] = rle["counts"].decode("ascii")
    return {"box": box, "mask": rle, "prompt": "mask"}
