"""Box-format conversions between normalised/absolute xyxy, xywh and cxcywh (wraps torchvision).

A format name is ``{frame}_{layout}``: frame ``abs`` (pixels) or ``norm`` (fractions of the image
width and height), layout ``xyxy``, ``xywh`` (COCO) or ``cxcywh`` (DETR). Inside the model boxes are
``norm_xyxy``; everything else is converted at the data boundary with :func:`convert_boxes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "BOX_FORMATS",
    "box_iou",
    "convert_boxes",
    "denormalize_boxes",
    "generalized_box_iou",
    "normalize_boxes",
]

_FRAMES = ("abs", "norm")
_LAYOUTS = ("xyxy", "xywh", "cxcywh")
BOX_FORMATS = tuple(f"{frame}_{layout}" for frame in _FRAMES for layout in _LAYOUTS)


def _parse_format(name: str, arg: str) -> tuple[str, str]:
    if name not in BOX_FORMATS:
        raise ValueError(f"{arg}={name!r} is not a box format; expected one of {BOX_FORMATS}")
    frame, layout = name.split("_", 1)
    return frame, layout


def _scale(image_size: Sequence[int] | Tensor, boxes: Tensor) -> Tensor:
    """(W, H, W, H) scale broadcastable against ``boxes`` (..., 4).

    ``image_size`` is (H, W), or a (B, 2) tensor of per-image (H, W) for boxes of shape (B, N, 4).
    """
    size = torch.as_tensor(image_size, dtype=boxes.dtype, device=boxes.device)
    if size.shape[-1] != 2:
        raise ValueError(f"image_size must end in (H, W), got shape {tuple(size.shape)}")
    if bool((size <= 0).any()):
        raise ValueError(f"image_size must be positive, got {size.tolist()}")
    scale = torch.stack([size[..., 1], size[..., 0], size[..., 1], size[..., 0]], dim=-1)
    if size.ndim == 2:  # (B, 2) sizes for (B, N, 4) boxes -> (B, 1, 4)
        scale = scale[:, None, :]
    return scale


def convert_boxes(
    boxes: Tensor,
    *,
    src: str,
    dst: str,
    image_size: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Converts boxes between formats.

    Args:
        boxes: (..., 4) float boxes in format ``src``.
        src: Source format, one of :data:`BOX_FORMATS`, e.g. ``"abs_xywh"``.
        dst: Target format, e.g. ``"norm_xyxy"``.
        image_size: (H, W) of the image the boxes live in, or a (B, 2) tensor of per-image sizes
            for (B, N, 4) boxes. Required only when the frame changes (``abs`` <-> ``norm``).

    Returns:
        (..., 4) boxes in format ``dst``, same dtype and device.
    """
    src_frame, src_layout = _parse_format(src, "src")
    dst_frame, dst_layout = _parse_format(dst, "dst")
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    out = boxes
    if src_layout != dst_layout:
        lead = out.shape[:-1]
        out = box_convert(out.reshape(-1, 4), in_fmt=src_layout, out_fmt=dst_layout).reshape(
            *lead, 4
        )
    if src_frame != dst_frame:
        if image_size is None:
            raise ValueError(f"image_size is required to convert {src} -> {dst}")
        scale = _scale(image_size, out)
        out = out / scale if dst_frame == "norm" else out * scale
    return out


def normalize_boxes(boxes_abs: Tensor, image_size: Sequence[int] | Tensor) -> Tensor:
    """Absolute xyxy -> normalised xyxy for an image of size (H, W)."""
    return convert_boxes(boxes_abs, src="abs_xyxy", dst="norm_xyxy", image_size=image_size)


def denormalize_boxes(boxes: Tensor, image_size: Sequence[int] | Tensor) -> Tensor:
    """Normalised xyxy -> absolute xyxy for an image of size (H, W)."""
    return convert_boxes(boxes, src="norm_xyxy", dst="abs_xyxy", image_size=image_size)
