"""Visual prompts other than boxes: points snap to a proposal, masks give a tight box."""

from __future__ import annotations

import torch
from torch import Tensor

PROMPT_KINDS = ("box", "point", "mask")


def snap_points(
    points: Tensor,
    proposal_boxes: Tensor,
    proposal_scores: Tensor,
    *,
    fallback_size: float = 0.1,
) -> Tensor:
    """A box for each point prompt: the best-scored proposal that contains the point (the
    smaller one on a tie), or a ``fallback_size`` square centred on it when none does.

    Args:
        points: (U, 2) normalised (x, y).
        proposal_boxes: (N, 4) normalised xyxy.
        proposal_scores: (N,) scores.
        fallback_size: Side of the fallback square, a share of the image. Defaults to 0.1.

    Returns:
        (U, 4) normalised xyxy boxes, clipped to the image.
    """
    if points.numel() == 0:
        return points.new_zeros(0, 4)
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (
        (proposal_boxes[None, :, 0] <= x)
        & (x <= proposal_boxes[None, :, 2])
        & (proposal_boxes[None, :, 1] <= y)
        & (y <= proposal_boxes[None, :, 3])
    )  # (U, N)
    area = (proposal_boxes[:, 2] - proposal_boxes[:, 0]) * (
        proposal_boxes[:, 3] - proposal_boxes[:, 1]
    )
    # Rank by score, then by smaller area; points outside rank last.
    rank = proposal_scores[None, :] - 1e-6 * area[None, :]
    rank = torch.where(inside, rank, torch.full_like(rank, -float("inf")))
    half = fallback_size / 2
    fallback = torch.cat([points - half, points + half], dim=1).clamp(0.0, 1.0)
    if proposal_boxes.shape[0] == 0:
        return fallback
    best = rank.argmax(dim=1)
    snapped = proposal_boxes[best]
    return torch.where(inside.any(dim=1, keepdim=True), snapped, fallback)


def mask_box(mask: Tensor) -> Tensor:
    """(4,) float pixel xyxy tight box of a (h, w) boolean mask (pixel edges, so a single pixel
    (x, y) gives (x, y, x + 1, y + 1)).

    Raises:
        ValueError: If the mask is empty.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("an empty mask has no box")
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def mask_point(mask: Tensor) -> tuple[float, float]:
    """A deterministic point prompt for a mask: the centre of the mask pixel nearest to the
    mask's centroid (inside the object even when it is not convex).

    Raises:
        ValueError: If the mask is empty.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("an empty mask has no point")
    cx, cy = xs.float().mean(), ys.float().mean()
    nearest = int(((xs.float() - cx) ** 2 + (ys.float() - cy) ** 2).argmin())
    return float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5
