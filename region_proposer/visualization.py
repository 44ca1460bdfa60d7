"""Pictures of boxes: ``draw_regions`` (boxes, RLE masks, labels) and ``draw_proposals`` (a
proposer's kept region set next to the ground truth, for a few images of a dataloader)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from .selection import select_regions

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


def draw_proposals(
    model: torch.nn.Module,
    dataloader: Any,
    out_dir: str | Path,
    *,
    num_images: int = 4,
    score_thr: float = 0.0,
    nms_thr: float | None = 0.7,
    top_k: int | None = 100,
) -> list[Path]:
    """Draws the kept region set (labelled by score) beside the ground truth for a few images.

    Args:
        model: A ``ProposerPretrainer`` (anything whose ``test_step`` returns data samples with
            ``pred_instances`` and ``gt_original`` in original-image pixels).
        dataloader: Test dataloader; images are read from each sample's ``img_path``.
        out_dir: Output folder for ``region_set_{i}.png``.
        num_images: How many images to draw.
        score_thr: Selection rule, as ``select_regions``.
        nms_thr: Selection rule, as ``select_regions``.
        top_k: Selection rule, as ``select_regions``.

    Returns:
        The written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    model.eval()
    for data in dataloader:
        with torch.no_grad():
            samples = model.test_step(data)
        for sample in samples:
            if len(written) >= num_images:
                return written
            pred = sample.pred_instances
            keep = select_regions(
                pred.bboxes.cpu(),
                pred.scores.cpu(),
                score_thr=score_thr,
                nms_thr=nms_thr,
                top_k=top_k,
            )
            image = Image.open(sample.metainfo["img_path"]).convert("RGB")
            gt = draw_regions(image, sample.gt_original.tolist(), ["gt"] * len(sample.gt_original))
            kept = draw_regions(
                image, pred.bboxes[keep].tolist(), [f"{s:.2f}" for s in pred.scores[keep].tolist()]
            )
            canvas = Image.new("RGB", (image.width * 2 + 8, image.height), "white")
            canvas.paste(gt, (0, 0))
            canvas.paste(kept, (image.width + 8, 0))
            path = out_dir / f"region_set_{len(written)}.png"
            canvas.save(path)
            written.append(path)
    return written
