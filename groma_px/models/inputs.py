"""Pure helpers of ``GromaPX``: the boxes a sample gives the selector, and the embedding splice."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor

from region_proposer.box_ops import normalize_boxes


@dataclass(frozen=True)
class SampleReferences:
    """The record regions a sample cites, split the way the selector needs them.

    Attributes:
        user_boxes: (U, 4) normalised xyxy of regions cited in human turns (visual prompts).
        gt_boxes: (G, 4) normalised xyxy of regions cited only in assistant turns (targets).
        record_ids: (U + G,) record-region index of each box above, user boxes first.
        placeholder_ids: (P,) record-region index cited by each placeholder, in order.
        user_points: (U, 2) normalised (x, y) of point prompts; NaN for other user regions.
        user_masks: Per user region, its (h, w) bool mask for a mask prompt, else None.
    """

    user_boxes: Tensor
    gt_boxes: Tensor
    record_ids: Tensor
    placeholder_ids: Tensor
    user_points: Tensor | None = None
    user_masks: tuple[Tensor | None, ...] = ()

    def placeholder_rows(self, ref_to_region: Tensor) -> Tensor:
        """(P,) kept-region row of each placeholder, given the selector's (U + G,) mapping."""
        if self.placeholder_ids.numel() == 0:
            return self.placeholder_ids.new_zeros(0)
        lookup = {int(r): int(row) for r, row in zip(self.record_ids, ref_to_region, strict=True)}
        return torch.tensor(
            [lookup[int(r)] for r in self.placeholder_ids],
            dtype=torch.long,
            device=self.placeholder_ids.device,
        )


def sample_references(sample: BaseDataElement, valid_size: Tensor) -> SampleReferences:
    """Splits a packed sample's cited regions into user and ground-truth boxes.

    A region cited in a human turn is a user region (kept with score 1.0), even when the answer
    cites it again; a region cited only by the assistant is a ground-truth target.

    A user region is a box prompt unless ``metainfo["region_prompts"][i]`` says otherwise:
    ``{"kind": "point", "point": [x, y]}`` (original pixels; mapped through ``affine``) or
    ``{"kind": "mask"}`` (its mask is row i of ``gt_masks``; its box is the record's box).

    Args:
        sample: Packed data sample with ``gt_boxes`` (M, 4) abs xyxy, ``ref_regions`` (P,) and
            ``ref_is_user`` (P,).
        valid_size: (2,) unpadded (h, w) of the sample's image.
    """
    boxes = normalize_boxes(sample.gt_boxes.float(), valid_size).clamp(0.0, 1.0)
    refs = sample.ref_regions.long()
    is_user = sample.ref_is_user.bool()
    user_ids = _unique_in_order(refs[is_user].tolist())
    gt_ids = [r for r in _unique_in_order(refs[~is_user].tolist()) if r not in set(user_ids)]
    num_regions = boxes.shape[0]
    bad = [r for r in user_ids + gt_ids if not 0 <= r < num_regions]
    if bad:
        raise ValueError(
            f"sample {sample.metainfo.get('sample_id')!r} cites regions {bad} but has "
            f"{num_regions} regions"
        )
    device = boxes.device
    points, masks = _prompts(sample, user_ids, valid_size)
    return SampleReferences(
        user_boxes=boxes[torch.tensor(user_ids, dtype=torch.long, device=device)].reshape(-1, 4),
        gt_boxes=boxes[torch.tensor(gt_ids, dtype=torch.long, device=device)].reshape(-1, 4),
        record_ids=torch.tensor(user_ids + gt_ids, dtype=torch.long, device=device),
        placeholder_ids=refs,
        user_points=points.to(device),
        user_masks=masks,
    )


def _prompts(
    sample: BaseDataElement, user_ids: list[int], valid_size: Tensor
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """Normalised points (NaN where none) and masks (None where none) of the user regions."""
    prompts = sample.metainfo.get("region_prompts") or []
    points = torch.full((len(user_ids), 2), float("nan"))
    masks: list[Tensor | None] = [None] * len(user_ids)
    sample_id = sample.metainfo.get("sample_id")
    for u, region in enumerate(user_ids):
        prompt = prompts[region] if region < len(prompts) else None
        kind = (prompt or {}).get("kind", "box")
        if kind == "point":
            ax, bx, ay, by = sample.metainfo.get("affine", (1.0, 0.0, 1.0, 0.0))
            x, y = (float(v) for v in prompt["point"])
            h, w = (float(v) for v in valid_size)
            points[u] = torch.tensor([(ax * x + bx) / w, (ay * y + by) / h]).clamp(0.0, 1.0)
        elif kind == "mask":
            if "gt_masks" not in sample:
                raise ValueError(
                    f"sample {sample_id!r}: region {region} is a mask prompt but the sample has "
                    "no gt_masks (load them with LoadGroundedRecord(with_mask=True))"
                )
            masks[u] = sample.gt_masks[region].bool()
        elif kind != "box":
            raise ValueError(f"sample {sample_id!r}: region {region} has prompt kind {kind!r}")
    return points, tuple(masks)


def _unique_in_order(values: list[int]) -> list[int]:
    return list(dict.fromkeys(values))


def splice_features(
    embeds: Tensor,
    *,
    image_slots: Tensor,
    image_feats: Tensor,
    region_slots: Tensor,
    region_add: Tensor,
    region_feats: Tensor,
    region_offsets: Tensor,
) -> Tensor:
    """Puts image and region features into a batch of token embeddings (no in-place writes).

    Args:
        embeds: (B, L, D) token embeddings.
        image_slots: (B, L) bool; row b's j-th True position receives ``image_feats[b, j]``.
        image_feats: (B, G, D) image tokens.
        region_slots: (B, L) long region row per position, -1 for none.
        region_add: (B, L) bool; True adds the region feature to the embedding (fused layout),
            False replaces the embedding (pair layout's ``<region>`` slot).
        region_feats: (sum K_b, D) region tokens of the batch, sample after sample.
        region_offsets: (B,) long index of each sample's first row in ``region_feats``.

    Returns:
        (B, L, D) embeddings.
    """
    num_images = image_slots.sum(dim=1)
    bad = [int(n) for n in num_images if int(n) not in (0, image_feats.shape[1])]
    if bad:
        raise ValueError(
            f"a sequence has {bad[0]} image slots; expected 0 or {image_feats.shape[1]}"
        )
    batch = torch.arange(embeds.shape[0], device=embeds.device)[:, None].expand_as(image_slots)
    rank = (image_slots.long().cumsum(dim=1) - 1).clamp(min=0, max=image_feats.shape[1] - 1)
    image = image_feats.to(embeds.dtype)[batch, rank]  # (B, L, D)
    has_region = region_slots >= 0
    if region_feats.shape[0]:
        rows = (region_offsets[:, None] + region_slots.clamp(min=0)).clamp(
            max=region_feats.shape[0] - 1
        )
        region = region_feats.to(embeds.dtype)[rows]  # (B, L, D)
    else:
        if bool(has_region.any()):
            raise ValueError("sequences cite region features but the batch has no regions")
        # Keep the empty region tokens in the graph: every region-encoder parameter then gets a
        # (zero) gradient, which DDP needs of every parameter on every rank.
        region = torch.zeros_like(embeds) + region_feats.sum().to(embeds.dtype)
    replace_region = (has_region & ~region_add)[..., None]
    add_region = (has_region & region_add)[..., None]
    out = torch.where(image_slots[..., None], image, embeds)
    out = torch.where(replace_region, region, out)
    return out + torch.where(add_region, region, torch.zeros_like(region))
