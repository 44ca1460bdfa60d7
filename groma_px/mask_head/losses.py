"""Mask losses: sigmoid BCE + dice on points sampled inside each image (Mask2Former style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of (N, h, w) maps at (N, P, 2) points, normalised (x, y) in [0, 1] of each
    map's extent (``align_corners=False``: 0 and 1 are the outer edges). Returns (N, P)."""
    grid = points[:, None] * 2.0 - 1.0  # (N, 1, P, 2)
    return F.grid_sample(maps[:, None], grid.to(maps.dtype), align_corners=False)[:, 0, 0]


def sample_points(
    logits: Tensor,
    extents: Tensor,
    num_points: int,
    *,
    oversample: float = 3.0,
    importance: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Points where the loss is evaluated: ``importance`` of them the most uncertain
    (``|logit|`` smallest) of ``oversample * num_points`` random ones, the rest uniform.

    Args:
        logits: (N, h, w) mask logits over the padded input.
        extents: (N, 2) share (x, y) of the padded input that is image (the valid area); points
            are drawn there only.
        num_points: P.
        oversample: Candidates per point for the uncertain part. Defaults to 3.
        importance: Share of uncertain points. Defaults to 0.75.
        generator: Random generator. Defaults to torch's global one.

    Returns:
        (N, P, 2) normalised (x, y) points of the padded input.
    """
    n = logits.shape[0]
    extents = extents[:, None, :].to(logits.dtype)
    candidates = int(num_points * oversample)
    rand = torch.rand(n, candidates, 2, generator=generator, device=logits.device)
    rand = rand.to(logits.dtype) * extents
    num_uncertain = int(num_points * importance)
    with torch.no_grad():
        uncertainty = -point_sample(logits.detach(), rand).abs()
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = rand.gather(1, top[..., None].expand(-1, -1, 2))
    shape = (n, num_points - num_uncertain, 2)
    uniform = torch.rand(shape, generator=generator, device=logits.device)
    return torch.cat([chosen, uniform.to(logits.dtype) * extents], dim=1)


def mask_losses(
    logits: Tensor,
    targets: Tensor,
    extents: Tensor,
    *,
    num_points: int = 4096,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Point-sampled sigmoid BCE and dice of N masks.

    Args:
        logits: (N, h, w) logits over the padded input.
        targets: (N, H, W) float {0, 1} target masks over the padded input (zero outside each
            image).
        extents: (N, 2) share (x, y) of the padded input covered by each mask's image.
        num_points: Points per mask. Defaults to 4096.
        bce_weight: Weight of the BCE term. Defaults to 1.
        dice_weight: Weight of the dice term. Defaults to 1.

    Returns:
        ``loss_mask_bce`` and ``loss_mask_dice`` (means over masks; zero, in the graph, for N=0).
    """
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return {"loss_mask_bce": zero, "loss_mask_dice": zero}
    points = sample_points(logits, extents, num_points)
    pred = point_sample(logits, points)
    target = point_sample(targets.to(logits.dtype), points)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1)
    prob = pred.sigmoid()
    dice = 1.0 - (2 * (prob * target).sum(1) + 1.0) / (prob.sum(1) + target.sum(1) + 1.0)
    return {"loss_mask_bce": bce_weight * bce.mean(), "loss_mask_dice": dice_weight * dice.mean()}
