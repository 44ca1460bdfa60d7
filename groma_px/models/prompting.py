"""``GromaPX``'s handling of visual prompts: point prompts snap to proposals, and a question's
``<refer_box>`` can carry its region feature."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor

from ..region_encoder.prompts import snap_points


class VisualPromptsMixin:
    """Methods of ``GromaPX`` that turn user regions into selector boxes and prompt ids."""

    def _user_boxes(self, ref: Any, boxes: Tensor, scores: Tensor) -> Tensor:
        """The user boxes, point prompts snapped to a proposal (``snap_points``)."""
        if ref.user_points is None or not bool(torch.isfinite(ref.user_points[:, 0]).any()):
            return ref.user_boxes
        is_point = torch.isfinite(ref.user_points[:, 0])
        snapped = snap_points(
            ref.user_points[is_point], boxes, scores, fallback_size=self.point_box_size
        )
        user = ref.user_boxes.clone()
        user[is_point] = snapped.to(user)
        return user

    def _user_ids(self, sample: BaseDataElement) -> Tensor:
        """``input_ids`` with the human turns' ``<refer_box>`` read as ``<refer_feat>`` when
        ``user_region_features`` (the region feature then sits where the question cites it)."""
        ids = sample.input_ids.long()
        if not self.user_region_features:
            return ids
        t = self.token_ids
        placeholders = torch.isin(ids, ids.new_tensor([t.refer_box, t.ground_box, t.refer_feat]))
        positions = torch.nonzero(placeholders).flatten()
        user = sample.ref_is_user.bool().to(positions.device)
        if len(user) != len(positions):  # build_sequence names the mismatch
            return ids
        swap = positions[user & (ids[positions] == t.refer_box)]
        return ids.index_fill(0, swap, t.refer_feat)
