"""Glue between ``GromaPX`` and its mask head: which cited regions get a mask, their targets,
and the predicted masks mapped back to original-image pixels as COCO RLE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.structures import BaseDataElement
from pycocotools import mask as mask_utils
from torch import Tensor

from .outputs import Perception


@dataclass
class CitedRegions:
    """Regions cited by supervised ``<rK>`` tokens that have a ground-truth mask.

    Attributes:
        batch_index: (N,) sample of each citation.
        rows: (N,) kept-region row K.
        gt_index: (N,) record region (row of the sample's ``gt_masks``) it stands for.
        positions: (N,) position of the ``<rK>`` label in the collated sequence; the state at
            ``positions - 1`` predicted it.
    """

    batch_index: Tensor
    rows: Tensor
    gt_index: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return int(self.batch_index.numel())

    def subset(self, limit: int | None) -> CitedRegions:
        """At most ``limit`` citations, drawn at random (torch's global RNG), in batch order."""
        if limit is None or len(self) <= limit:
            return self
        keep = torch.randperm(len(self), device=self.batch_index.device)[:limit].sort().values
        return CitedRegions(
            self.batch_index[keep], self.rows[keep], self.gt_index[keep], self.positions[keep]
        )


def cited_regions(
    data_samples: list[BaseDataElement],
    perception: Perception,
    labels: Tensor,
    region_cols: Tensor,
) -> CitedRegions:
    """The assistant citations of a batch that can be supervised with a mask.

    The supervised ``<rK>`` labels of sample b are its assistant placeholders, in order; each
    maps to a kept row (through the selector) and a record region. Citations of regions whose
    mask is missing (``gt_mask_valid`` False) or of samples without ``gt_masks`` are skipped.

    Raises:
        ValueError: If a sample's supervised region tokens do not match its assistant
            placeholders (names the sample).
    """
    out: dict[str, list[int]] = {"b": [], "row": [], "gt": [], "pos": []}
    cols = region_cols.to(labels.device)
    for b, (sample, sel, ref) in enumerate(
        zip(data_samples, perception.selections, perception.references, strict=True)
    ):
        if "gt_masks" not in sample:
            continue
        assistant = ~sample.ref_is_user.bool()
        gt_index = sample.ref_regions.long()[assistant.cpu()].tolist()
        rows = ref.placeholder_rows(sel.ref_to_region)[assistant.to(sel.ref_to_region.device)]
        positions = torch.nonzero(torch.isin(labels[b], cols)).flatten().tolist()
        expected = cols[rows.to(cols.device)].tolist()
        found = labels[b, positions].tolist()
        if found != expected:
            raise ValueError(
                f"sample {sample.metainfo.get('sample_id')}: supervised region tokens {found} do "
                f"not match its assistant placeholders {expected}"
            )
        valid = sample.get("gt_mask_valid")
        for row, j, pos in zip(rows.tolist(), gt_index, positions, strict=True):
            if valid is None or bool(valid[j]):
                out["b"].append(b)
                out["row"].append(row)
                out["gt"].append(j)
                out["pos"].append(pos)
    device = labels.device
    return CitedRegions(*(torch.tensor(out[k], dtype=torch.long, device=device) for k in out))


def padded_targets(
    data_samples: list[BaseDataElement],
    cited: CitedRegions,
    valid_sizes: Tensor,
    padded_hw: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Target masks over the padded input and each one's image extent.

    Returns:
        ``(targets (N, H, W) float, extents (N, 2) (w_b / W, h_b / H))``.

    Raises:
        ValueError: If a sample's ``gt_masks`` are not the size of its (unpadded) image.
    """
    height, width = padded_hw
    targets = torch.zeros(len(cited), height, width, device=valid_sizes.device)
    extents = torch.zeros(len(cited), 2, device=valid_sizes.device)
    for n, (b, j) in enumerate(
        zip(cited.batch_index.tolist(), cited.gt_index.tolist(), strict=True)
    ):
        h, w = (int(v) for v in valid_sizes[b])
        masks = data_samples[b].gt_masks
        if tuple(masks.shape[-2:]) != (h, w):
            raise ValueError(
                f"sample {data_samples[b].metainfo.get('sample_id')}: gt_masks are "
                f"{tuple(masks.shape[-2:])}, its image is {(h, w)}"
            )
        targets[n, :h, :w] = masks[j].to(targets)
        extents[n] = torch.tensor([w / width, h / height])
    return targets, extents


def first_citations(tokens: Tensor, region_cols: Tensor, num_rows: int) -> list[tuple[int, int]]:
    """``(row, step)`` of each kept row that a generated sequence cites, at its first citation.

    Args:
        tokens: (T,) generated ids.
        region_cols: Ids of ``<r0>``, ``<r1>``, ...
        num_rows: Kept regions of the sample (other indices are not regions).
    """
    lookup = {int(c): k for k, c in enumerate(region_cols.tolist()) if k < num_rows}
    seen: dict[int, int] = {}
    for step, token in enumerate(tokens.tolist()):
        row = lookup.get(token)
        if row is not None and row not in seen:
            seen[row] = step
    return list(seen.items())


def logits_to_rle(logits: Tensor, padded_hw: tuple[int, int], metainfo: dict[str, Any]) -> dict:
    """(h, w) mask logits over the padded input -> COCO RLE in original-image pixels.

    Each original pixel centre is mapped through the sample's ``affine`` (x' = ax x + bx,
    y' = ay y + by) into the padded input and the logits are sampled bilinearly there.
    """
    ori_h, ori_w = (int(v) for v in metainfo["ori_shape"])
    ax, bx, ay, by = metainfo.get("affine", (1.0, 0.0, 1.0, 0.0))
    height, width = padded_hw
    xs = (torch.arange(ori_w, dtype=torch.float32) + 0.5) * ax + bx
    ys = (torch.arange(ori_h, dtype=torch.float32) + 0.5) * ay + by
    grid = torch.stack(
        [
            (xs / width * 2 - 1)[None, :].expand(ori_h, -1),
            (ys / height * 2 - 1)[:, None].expand(-1, ori_w),
        ],
        dim=-1,
    ).to(logits)
    sampled = F.grid_sample(logits[None, None], grid[None], align_corners=False)[0, 0]
    binary = np.asfortranarray((sampled > 0).cpu().numpy().astype(np.uint8))
    rle = mask_utils.encode(binary)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
