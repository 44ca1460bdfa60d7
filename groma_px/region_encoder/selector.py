"""Which regions become region tokens: proposals, user boxes and (in training) GT boxes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from groma_px.registry import MODELS
from groma_px.structures import RegionSource
from region_proposer.selection import select_regions

_USER_SCORE = 1.0  # user (visual-prompt) regions outrank every proposal


@dataclass(frozen=True)
class RegionSelection:
    """The regions kept for one image, in token order (row ``i`` is ``<ri>``).

    Attributes:
        boxes: (K, 4) float normalised xyxy of the kept regions.
        scores: (K,) float score of each kept region (1.0 for user regions).
        source: (K,) long :class:`RegionSource` code of each kept region.
        ref_to_region: (R,) long kept row of each reference box (user boxes first, then GT
            boxes, as passed in); -1 when nothing was kept.
        ref_iou: (R,) float IoU between each reference box and its kept row; 0 when nothing
            was kept.
    """

    boxes: Tensor
    scores: Tensor
    source: Tensor
    ref_to_region: Tensor
    ref_iou: Tensor

    def __post_init__(self) -> None:
        k = self.boxes.shape[0]
        if self.boxes.shape != (k, 4) or self.scores.shape != (k,) or self.source.shape != (k,):
            raise ValueError(
                f"RegionSelection needs boxes (K, 4), scores (K,), source (K,), got "
                f"{tuple(self.boxes.shape)}, {tuple(self.scores.shape)}, {tuple(self.source.shape)}"
            )
        if self.ref_to_region.shape != self.ref_iou.shape or self.ref_iou.ndim != 1:
            raise ValueError(
                f"RegionSelection needs ref_to_region (R,) and ref_iou (R,), got "
                f"{tuple(self.ref_to_region.shape)} and {tuple(self.ref_iou.shape)}"
            )

    @property
    def num_regions(self) -> int:
        """Number of kept regions K."""
        return int(self.boxes.shape[0])


def _check_boxes(name: str, boxes: Tensor) -> None:
    """Raises a ValueError naming ``name`` unless ``boxes`` is finite (N, 4) xyxy in [0, 1]."""
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name} holds non-finite values")
    if bool(((boxes < 0) | (boxes > 1)).any()):
        raise ValueError(f"{name} must be normalised to [0, 1]")
    if bool((boxes[:, 2:] < boxes[:, :2]).any()):
        raise ValueError(f"{name} must be xyxy with x0 <= x1 and y0 <= y1")


def _check_scores(scores: Tensor, num_boxes: int) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise ValueError("proposal_scores must be a floating-point tensor")
    if scores.shape != (num_boxes,):
        raise ValueError(
            f"proposal_scores must have shape ({num_boxes},) to match proposal_boxes, "
            f"got {tuple(scores.shape)}"
        )
    if not bool(torch.isfinite(scores).all()) or bool(((scores < 0) | (scores > 1)).any()):
        raise ValueError("proposal_scores must be finite and lie in [0, 1]")


@MODELS.register_module()
class RegionSelector:
    """Groma's region-selection rule: the proposal set the LLM sees, plus user and GT regions.

    User boxes (visual prompts) get score 1.0 and are always kept, first and in the given order.
    In training (and with ``use_gt``) GT boxes join the proposals with the low score ``gt_score``,
    so NMS keeps a good proposal over an overlapping GT box and a GT box only survives where no
    proposal covers it: the LLM always has a region for every referred object. The non-user
    candidates go through :func:`region_proposer.selection.select_regions` (the rule the
    region-set recall metric measures) with ``top_k`` reduced by the number of user boxes.

    Args:
        score_thr: Keep candidates with ``score >= score_thr``. Defaults to 0.05.
        nms_thr: NMS IoU threshold among the non-user candidates; None disables NMS.
            Defaults to 0.7.
        top_k: Number of region tokens K (user boxes included). Defaults to 100.
        use_gt: Add GT boxes to the candidates in training. Defaults to True.
        gt_score: Score given to GT candidates; must be >= ``score_thr``. Defaults to 0.3.
        shuffle: In training, randomly permute the kept rows (user rows included) so the LLM
            cannot learn that ``<r0>`` is the referred region. Defaults to False.
        test_cfg: ``score_thr`` and/or ``nms_thr`` used instead outside training (evaluation,
            chat), as detectron2's RPN has train and test NMS settings. A looser test rule
            keeps more regions: the target is more often among them, at the price of more
            distractors (``benchmarks/bench_selection.py`` measures both on a trained model).
            None: the training rule everywhere. Defaults to None.
    """

    def __init__(
        self,
        *,
        score_thr: float = 0.05,
        nms_thr: float | None = 0.7,
        top_k: int = 100,
        use_gt: bool = True,
        gt_score: float = 0.3,
        shuffle: bool = False,
        test_cfg: dict | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        _check_rule(score_thr, nms_thr, "")
        test_cfg = dict(test_cfg or {})
        unknown = sorted(set(test_cfg) - {"score_thr", "nms_thr"})
        if unknown:
            raise ValueError(f"test_cfg: unknown keys {unknown}; known: score_thr, nms_thr")
        self.test_score_thr = test_cfg.get("score_thr", score_thr)
        self.test_nms_thr = test_cfg.get("nms_thr", nms_thr)
        _check_rule(self.test_score_thr, self.test_nms_thr, "test_cfg.")
        if use_gt and gt_score < score_thr:
            # A GT candidate below the threshold would be dropped silently, every time.
            raise ValueError(f"gt_score={gt_score} is below score_thr={score_thr}")
        self.score_thr = score_thr
        self.nms_thr = nms_thr
        self.top_k = top_k
        self.use_gt = use_gt
        self.gt_score = gt_score
        self.shuffle = shuffle

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(score_thr={self.score_thr}, nms_thr={self.nms_thr}, "
            f"top_k={self.top_k}, use_gt={self.use_gt}, gt_score={self.gt_score}, "
            f"shuffle={self.shuffle}, test_cfg={self.test_cfg})"
        )

    @property
    def test_cfg(self) -> dict[str, float | None]:
        """The rule outside training (the training rule's values where not overridden)."""
        return {"score_thr": self.test_score_thr, "nms_thr": self.test_nms_thr}

    @property
    def min_score_thr(self) -> float:
        """The lowest score any rule of this selector keeps (training or test)."""
        return min(self.score_thr, self.test_score_thr)

    def __call__(
        self,
        proposal_boxes: Tensor,
        proposal_scores: Tensor,
        *,
        user_boxes: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> RegionSelection:
        """Selects the regions of one image.

        Args:
            proposal_boxes: (N, 4) normalised xyxy proposals (N may be 0).
            proposal_scores: (N,) proposal scores in [0, 1].
            user_boxes: (U, 4) normalised xyxy user regions, or None.
            gt_boxes: (G, 4) normalised xyxy GT regions, or None. They are candidates only in
                training; they are always references (mapped to their best kept row).
            training: Training mode (GT candidates, shuffling). Defaults to False.
            generator: Random generator for the shuffle. Defaults to torch's global one.

        Returns:
            The kept regions and the mapping of every reference box (user, then GT) to a row.

        Raises:
            ValueError: On malformed inputs, or when U > ``top_k``.
        """
        _check_boxes("proposal_boxes", proposal_boxes)
        _check_scores(proposal_scores, proposal_boxes.shape[0])
        user = self._optional_boxes("user_boxes", user_boxes, proposal_boxes)
        gt = self._optional_boxes("gt_boxes", gt_boxes, proposal_boxes)
        num_user = user.shape[0]
        if num_user > self.top_k:
            raise ValueError(
                f"more user regions ({num_user}) than region tokens (top_k={self.top_k})"
            )
        boxes, scores, source = self._candidates(proposal_boxes, proposal_scores, gt, training)
        keep = select_regions(
            boxes,
            scores,
            score_thr=self.score_thr if training else self.test_score_thr,
            nms_thr=self.nms_thr if training else self.test_nms_thr,
            top_k=self.top_k - num_user,
        )
        user_source = torch.full((num_user,), int(RegionSource.USER), device=boxes.device)
        kept_boxes = torch.cat([user.to(boxes.dtype), boxes[keep]])
        kept_scores = torch.cat([scores.new_full((num_user,), _USER_SCORE), scores[keep]])
        kept_source = torch.cat([user_source, source[keep]])
        order = torch.arange(kept_boxes.shape[0], device=boxes.device)
        if self.shuffle and training:
            order = _random_order(kept_boxes.shape[0], generator).to(boxes.device)
        user_rows = torch.argsort(order)[:num_user]  # where each user row went
        kept_boxes, kept_scores, kept_source = (
            kept_boxes[order],
            kept_scores[order],
            kept_source[order],
        )
        ref_to_region, ref_iou = _map_references(kept_boxes, user_rows, gt)
        return RegionSelection(kept_boxes, kept_scores, kept_source, ref_to_region, ref_iou)

    @staticmethod
    def _optional_boxes(name: str, boxes: Tensor | None, like: Tensor) -> Tensor:
        """``boxes`` checked, or an empty (0, 4) tensor when None."""
        if boxes is None:
            return like.new_zeros((0, 4))
        _check_boxes(name, boxes)
        return boxes.to(like.device)

    def _candidates(
        self, boxes: Tensor, scores: Tensor, gt: Tensor, training: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Non-user candidates: proposals, plus GT boxes at ``gt_score`` in training."""
        source = torch.full((boxes.shape[0],), int(RegionSource.PROPOSER), device=boxes.device)
        if not (training and self.use_gt and gt.shape[0] > 0):
            return boxes, scores, source
        gt_source = torch.full((gt.shape[0],), int(RegionSource.GROUND_TRUTH), device=boxes.device)
        return (
            torch.cat([boxes, gt.to(boxes.dtype)]),
            torch.cat([scores, scores.new_full((gt.shape[0],), self.gt_score)]),
            torch.cat([source, gt_source]),
        )


def _check_rule(score_thr: float, nms_thr: float | None, prefix: str) -> None:
    if not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"{prefix}score_thr must lie in [0, 1], got {score_thr}")
    if nms_thr is not None and not 0.0 <= nms_thr <= 1.0:
        raise ValueError(f"{prefix}nms_thr must lie in [0, 1] or be None, got {nms_thr}")


def _random_order(num: int, generator: torch.Generator | None) -> Tensor:
    """A random permutation of ``num`` rows, drawn on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(num, generator=generator, device=device)


def _map_references(kept: Tensor, user_rows: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Kept row and IoU of each reference: user boxes their own row, GT boxes the best IoU.

    A user row *is* its box, so its IoU is 1 (even for a zero-area box). GT ties go to the lowest
    row (``argmax`` returns the first maximum). With nothing kept there is no row to point at:
    GT references get row -1 and IoU 0 (users are always kept, so then U = 0).
    """
    user_iou = kept.new_ones(user_rows.shape[0])
    if gt.shape[0] == 0:
        gt_rows = user_rows.new_zeros(0)
        gt_iou = kept.new_zeros(0)
    elif kept.shape[0] == 0:
        gt_rows = torch.full((gt.shape[0],), -1, dtype=torch.long, device=kept.device)
        gt_iou = kept.new_zeros(gt.shape[0])
    else:
        iou = box_iou(gt.to(kept.dtype), kept).nan_to_num(0.0)  # zero-area boxes: 0/0
        gt_rows = iou.argmax(dim=1)
        gt_iou = iou.gather(1, gt_rows[:, None]).squeeze(1)
    return torch.cat([user_rows.long(), gt_rows.long()]), torch.cat([user_iou, gt_iou])
