"""What ``GromaPX`` hands out: per-batch perception, kept regions in pixels, ``RegionTokens``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.structures import BaseDataElement
from torch import Tensor

from region_proposer.box_ops import denormalize_boxes
from region_proposer.pretrain.transforms import to_original_boxes
from region_proposer.structures import FeaturePyramid, Proposals

from ..llm.sequence import IGNORE_INDEX
from ..structures import GroundedRegion, RegionSource, RegionTokens
from .inputs import SampleReferences


@dataclass
class Perception:
    """What the frozen-or-not perception side produced for a batch."""

    pyramids: dict[str, FeaturePyramid]
    proposals: Proposals
    selections: list[Any]  # RegionSelection per sample
    references: list[SampleReferences]
    image: Tensor | None = None  # the normalised padded input batch (pixel-level region branch)


def kept_regions(
    selection: Any, sample: BaseDataElement, valid_size: Tensor
) -> tuple[list[GroundedRegion], Tensor]:
    """Kept regions (row i = ``<ri>``) in original-image pixels."""
    boxes = to_original_boxes(denormalize_boxes(selection.boxes, valid_size), sample.metainfo)
    h, w = sample.metainfo.get("ori_shape", (float("inf"), float("inf")))
    boxes = (
        torch.stack(
            [
                boxes[:, 0].clamp(0, w),
                boxes[:, 1].clamp(0, h),
                boxes[:, 2].clamp(0, w),
                boxes[:, 3].clamp(0, h),
            ],
            dim=-1,
        )
        if boxes.numel()
        else boxes.reshape(0, 4)
    )
    regions = [
        GroundedRegion(
            box=tuple(float(v) for v in box),
            score=float(min(max(float(score), 0.0), 1.0)),
            source=RegionSource(int(code)).label,
        )
        for box, score, code in zip(boxes, selection.scores, selection.source, strict=True)
    ]
    return regions, boxes.detach().cpu()


def padded_region_tokens(perception: Perception, batch: dict[str, Tensor]) -> RegionTokens:
    """Padded ``RegionTokens`` of the batch (row i of sample b is its ``<ri>``)."""
    sels = perception.selections
    feats = batch["region_feats"]
    num = max([len(s.boxes) for s in sels] + [0])
    b = len(sels)
    tokens = feats.new_zeros(b, num, feats.shape[-1])
    boxes = feats.new_zeros(b, num, 4)
    valid = torch.zeros(b, num, dtype=torch.bool, device=feats.device)
    source = torch.zeros(b, num, dtype=torch.long, device=feats.device)
    start = 0
    for i, sel in enumerate(sels):
        k = len(sel.boxes)
        tokens[i, :k] = feats[start : start + k]
        boxes[i, :k] = sel.boxes.to(feats)
        valid[i, :k] = True
        source[i, :k] = sel.source.to(source)
        start += k
    return RegionTokens(tokens=tokens, boxes=boxes, valid=valid, source=source)


def rank_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over data-parallel ranks (``value`` itself without an initialised
    process group). A collective: every rank must call it, even with nothing to average."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def next_token_loss(
    logits: Tensor,
    labels: Tensor,
    region_ids: Tensor,
    region_weight: float,
    *,
    global_average: bool = False,
) -> dict[str, Tensor]:
    """Token-averaged cross-entropy with ``<ri>`` targets weighted ``region_weight``, and the
    teacher-forced share of ``<ri>`` targets predicted exactly (``region_acc``, a diagnostic).

    Args:
        logits: (B, L, V) logits already shifted to predict ``labels``.
        labels: (B, L) target ids, ``IGNORE_INDEX`` where unsupervised.
        region_ids: (K,) ids of ``<r0>`` ... ``<r{K-1}>``.
        region_weight: Weight of region targets (1.0: plain CE).
        global_average: Divide by the mean over data-parallel ranks of the (weighted) number of
            supervised tokens instead of this rank's own: DDP/FSDP then average gradients to
            those of the mean over every token of the global batch, as one process with the
            whole batch computes; a per-rank mean would weight a rank's tokens by the inverse of
            its token count. Identical without an initialised process group. Defaults to False.
    """
    flat = labels.reshape(-1)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="none"
    )
    weights = (flat != IGNORE_INDEX).float()
    is_region = torch.isin(flat, region_ids.to(flat.device))
    if region_weight != 1.0:
        weights = torch.where(is_region, weights * region_weight, weights)
    count = rank_mean(weights.sum().detach()) if global_average else weights.sum().detach()
    loss = (per_token * weights).sum() / count.clamp(min=1.0)
    if bool(is_region.any()):
        hits = logits.reshape(-1, logits.shape[-1]).argmax(-1)[is_region] == flat[is_region]
        accuracy = hits.float().mean().detach()
    else:
        accuracy = logits.new_zeros(())
    return {"loss": loss, "region_acc": accuracy}
