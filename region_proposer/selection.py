"""The region-selection rule (score threshold, NMS, top-K) shared by the recall metric and the
``groma_px`` RegionSelector, so that "region-set recall" measures exactly what the LLM will see."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms


def select_regions(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_thr: float = 0.0,
    nms_thr: float | None = 0.7,
    top_k: int | None = 100,
) -> Tensor:
    """Indices of the regions kept for one image, best score first.

    Args:
        boxes: (N, 4) xyxy boxes (any frame; NMS is scale-invariant within one image).
        scores: (N,) scores in [0, 1].
        score_thr: Keep regions with ``score >= score_thr``. Defaults to 0.
        nms_thr: IoU above which a lower-scored region is suppressed; None disables NMS.
        top_k: Keep at most this many; None keeps all.

    Returns:
        (K,) long indices into ``boxes``, ordered by descending score (ties by index).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"select_regions needs boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and "
            f"{tuple(scores.shape)}"
        )
    if not bool(torch.isfinite(boxes).all()) or not bool(torch.isfinite(scores).all()):
        raise ValueError("select_regions got non-finite boxes or scores")
    candidates = torch.nonzero(scores >= score_thr, as_tuple=False).flatten()
    # Stable order: descending score, then ascending index, so selection is deterministic.
    order = torch.argsort(-scores[candidates].double(), stable=True)
    candidates = candidates[order]
    if nms_thr is not None and candidates.numel() > 1:
        kept = nms(boxes[candidates].float(), scores[candidates].float(), nms_thr)
        candidates = candidates[kept.sort().values]  # positions in the stable order above
    if top_k is not None:
        candidates = candidates[:top_k]
    return candidates
