"""``GroundTruthProposer``: an oracle that proposes the annotated boxes, optionally corrupted."""

from __future__ import annotations

import hashlib

import torch
from mmengine.structures import InstanceData
from torch import Tensor

from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .base import BaseProposer

__all__ = ["GroundTruthProposer"]


@MODELS.register_module()
class GroundTruthProposer(BaseProposer):
    """Proposes each image's ground-truth boxes: the upper bound of a proposer, for ablations.

    Per image: drop each GT box with probability ``drop_rate``, add Gaussian ``jitter`` to the
    rest, add ``num_distractors`` uniformly random boxes, and (``shuffle=True``) shuffle the
    order so that a downstream model cannot learn "the first regions are the real ones".

    Randomness is seeded per sample: the generator is derived from ``seed`` and the sample's
    ``metainfo["sample_id"]``, so a sample gets the same proposals whatever batch it is in and
    in every epoch. Images without a ``sample_id`` draw from ``seed``, a call counter and their
    batch index (reproducible for the same sequence of calls).

    Args:
        jitter: Std of the Gaussian noise on each coordinate, as a fraction of the box width
            (x) or height (y); jittered boxes are clipped to the image. Defaults to 0.
        drop_rate: Probability of dropping each GT box, in [0, 1]. Defaults to 0.
        num_distractors: Random boxes added per image. Defaults to 0.
        score: Score of GT boxes, in [0, 1]. Defaults to 1.
        distractor_score: Score of distractors, in [0, score). Defaults to 0.1.
        shuffle: Shuffle GT boxes and distractors per image. Defaults to True.
        seed: Base seed. Defaults to 0.
    """

    trainable = False

    def __init__(
        self,
        *,
        jitter: float = 0.0,
        drop_rate: float = 0.0,
        num_distractors: int = 0,
        score: float = 1.0,
        distractor_score: float = 0.1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if jitter < 0 or not 0.0 <= drop_rate <= 1.0 or num_distractors < 0:
            raise ValueError(
                "need jitter >= 0, drop_rate in [0, 1] and num_distractors >= 0, got "
                f"jitter={jitter}, drop_rate={drop_rate}, num_distractors={num_distractors}"
            )
        if not 0.0 <= distractor_score < score <= 1.0:
            raise ValueError(
                "need 0 <= distractor_score < score <= 1, got "
                f"distractor_score={distractor_score}, score={score}"
            )
        self.jitter = float(jitter)
        self.drop_rate = float(drop_rate)
        self.num_distractors = int(num_distractors)
        self.score = float(score)
        self.distractor_score = float(distractor_score)
        self.shuffle = shuffle
        self.seed = int(seed)
        self._num_calls = 0

    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Proposals from the ground truth of each image.

        Args:
            feats: Features of the batch (only its batch size and device are used).
            instances: One ``InstanceData`` per image with ``bboxes`` (M_i, 4) normalised xyxy.

        Returns:
            ``Proposals`` padded to the largest per-image count (kept GT + distractors); N = 0
            when every image has none.
        """
        gt_boxes = _gt_boxes(feats, instances)
        per_image = [
            self._propose_one(boxes, self._generator(inst, i))
            for i, (boxes, inst) in enumerate(zip(gt_boxes, instances or [], strict=True))
        ]
        self._num_calls += 1
        return _pad(per_image, device=feats.maps[0].device)

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """The oracle proposals and no losses (nothing to train)."""
        return self(feats, instances), {}

    def _generator(self, inst: InstanceData, index: int) -> torch.Generator:
        sample_id = inst.metainfo.get("sample_id")
        key = (
            f"{self.seed}/id/{sample_id}"
            if sample_id is not None
            else f"{self.seed}/call/{self._num_calls}/{index}"
        )
        digest = hashlib.sha256(key.encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _propose_one(self, boxes: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(K, 4) normalised xyxy boxes and (K,) scores for one image, on the CPU."""
        # Draw every random number whatever the options, so that e.g. jitter does not change
        # which boxes are dropped.
        keep = torch.rand(len(boxes), generator=gen) >= self.drop_rate
        noise = torch.randn(len(boxes), 4, generator=gen)
        kept = _jitter(boxes, noise, self.jitter)[keep]
        distractors = _random_boxes(self.num_distractors, gen)
        out = torch.cat([kept, distractors])
        scores = torch.cat(
            [
                torch.full((len(kept),), self.score),
                torch.full((len(distractors),), self.distractor_score),
            ]
        )
        order = torch.randperm(len(out), generator=gen)
        if self.shuffle:
            out, scores = out[order], scores[order]
        return out, scores


def _gt_boxes(feats: FeaturePyramid, instances: list[InstanceData] | None) -> list[Tensor]:
    """Per-image GT boxes (M_i, 4) as float32 CPU tensors, with the input checked."""
    if instances is None:
        raise ValueError("GroundTruthProposer needs instances (one InstanceData per image)")
    if len(instances) != feats.batch_size:
        raise ValueError(
            f"GroundTruthProposer got {len(instances)} instances for a batch of {feats.batch_size}"
        )
    out = []
    for i, inst in enumerate(instances):
        if "bboxes" not in inst:
            raise ValueError(f"instances[{i}] has no 'bboxes' (normalised xyxy GT boxes)")
        boxes = torch.as_tensor(inst.bboxes).detach().float().cpu()
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"instances[{i}].bboxes must be (M, 4), got {tuple(boxes.shape)}")
        out.append(boxes.reshape(-1, 4))
    return out


def _jitter(boxes: Tensor, noise: Tensor, jitter: float) -> Tensor:
    """Adds ``noise * jitter * (w, h, w, h)`` to (M, 4) xyxy boxes, kept ordered and in [0, 1]."""
    if jitter == 0 or len(boxes) == 0:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    moved = boxes + noise * jitter * wh.repeat(1, 2)
    low = torch.minimum(moved[:, :2], moved[:, 2:])
    high = torch.maximum(moved[:, :2], moved[:, 2:])
    return torch.cat([low, high], dim=1).clamp(0.0, 1.0)


def _random_boxes(num: int, gen: torch.Generator) -> Tensor:
    """(num, 4) uniformly random normalised xyxy boxes (sorted corner pairs per axis)."""
    corners = torch.rand(num, 2, 2, generator=gen).sort(dim=1).values  # (num, [lo, hi], [x, y])
    return corners.reshape(num, 4)


def _pad(per_image: list[tuple[Tensor, Tensor]], *, device: torch.device) -> Proposals:
    """Stacks per-image (K_i, 4) boxes and (K_i,) scores into padded ``Proposals``."""
    num = max((len(scores) for _, scores in per_image), default=0)
    batch = len(per_image)
    boxes = torch.zeros(batch, num, 4)
    scores = torch.zeros(batch, num)
    valid = torch.zeros(batch, num, dtype=torch.bool)
    for i, (boxes_i, scores_i) in enumerate(per_image):
        boxes[i, : len(scores_i)] = boxes_i
        scores[i, : len(scores_i)] = scores_i
        valid[i, : len(scores_i)] = True
    return Proposals(boxes=boxes.to(device), scores=scores.to(device), valid=valid.to(device))
