"""HungarianMatcher: hand-built golden cases and parity with transformers' Deformable DETR."""

import math

import pytest
import torch

from region_proposer.matching import HungarianMatcher
from region_proposer.registry import MODELS


def random_case(seed: int, num_targets: list[int], num_queries: int = 12):
    """Random logits (B, N, 1), predicted and target cxcywh boxes inside the unit square."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(n: int) -> torch.Tensor:
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        return torch.cat([centre, size], dim=1)

    logits = torch.randn(len(num_targets), num_queries, 1, generator=gen) * 2
    pred = torch.stack([boxes(num_queries) for _ in num_targets])
    return logits, pred, [boxes(m) for m in num_targets]


def test_golden_obvious_assignment():
    targets = [torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.3, 0.3]])]
    pred = torch.tensor([[[0.74, 0.76, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1], [0.26, 0.25, 0.2, 0.2]]])
    ((pred_idx, target_idx),) = HungarianMatcher()(torch.zeros(1, 3, 1), pred, targets)
    assert pred_idx.tolist() == [0, 2] and target_idx.tolist() == [1, 0]
    assert pred_idx.dtype == target_idx.dtype == torch.int64


def test_golden_cost_value():
    # logit 0 -> p = 0.5: focal cost (0.25 - 0.75) * 0.5**2 * ln 2; identical boxes: L1 0, GIoU 1.
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    cost = HungarianMatcher().cost_matrix(
        torch.zeros(1, 1), box, box, torch.zeros(1, dtype=torch.long)
    )
    expected = 2.0 * (-0.5 * 0.25 * math.log(2)) + 0.0 - 2.0 * 1.0
    torch.testing.assert_close(cost, torch.tensor([[expected]]))


def test_class_cost_prefers_confident_prediction():
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    pred = box.expand(1, 2, 4).clone()
    logits = torch.tensor([[[-3.0], [3.0]]])
    ((pred_idx, _),) = HungarianMatcher()(logits, pred, [box[None]])
    assert pred_idx.tolist() == [1]


def test_target_labels_select_class_column():
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])  # query 0 says class 0, query 1 class 1
    out = HungarianMatcher()(logits, box.expand(1, 2, 4).clone(), [box[None]], [torch.tensor([1])])
    assert out[0][0].tolist() == [1]
    with pytest.raises(ValueError, match="target_labels"):
        HungarianMatcher()(logits, box.expand(1, 2, 4).clone(), [box[None]], [torch.tensor([2])])


def test_empty_targets_give_empty_indices():
    logits, pred, targets = random_case(0, [0, 3, 0])
    out = HungarianMatcher()(logits, pred, targets)
    assert [len(p) for p, _ in out] == [0, 3, 0]
    assert out[0][0].dtype == torch.int64 and out[0][1].shape == (0,)


def test_more_targets_than_queries():
    logits, pred, targets = random_case(1, [5], num_queries=3)
    ((pred_idx, target_idx),) = HungarianMatcher()(logits, pred, targets)
    assert sorted(pred_idx.tolist()) == [0, 1, 2] and len(set(target_idx.tolist())) == 3


@pytest.mark.parametrize("where", ["logits", "boxes"])
def test_non_finite_cost_raises(where):
    logits, pred, targets = random_case(2, [2])
    if where == "logits":
        logits[0, 0, 0] = float("nan")
    else:
        pred[0, 1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="image 0.*pred_"):
        HungarianMatcher()(logits, pred, targets)


def test_bad_inputs_raise():
    logits, pred, targets = random_case(3, [2, 1])
    with pytest.raises(ValueError, match="batch of 2"):
        HungarianMatcher()(logits, pred, targets[:1])
    with pytest.raises(ValueError, match="not all zero"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


def test_built_from_registry_and_no_grad():
    matcher = MODELS.build(dict(type="HungarianMatcher", cost_bbox=1.0))
    assert isinstance(matcher, HungarianMatcher) and matcher.cost_bbox == 1.0
    logits, pred, targets = random_case(4, [2])
    logits.requires_grad_(True)
    out = matcher(logits, pred, targets)
    assert not out[0][0].requires_grad


def test_matches_transformers_deformable_detr():
    loss_module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    reference = loss_module.DeformableDetrHungarianMatcher(
        class_cost=2.0, bbox_cost=5.0, giou_cost=2.0
    )
    for seed, sizes in enumerate([[4, 0, 7, 12], [1, 5], [12, 3, 0]]):
        logits, pred, targets = random_case(10 + seed, sizes)
        labels = [
            {"class_labels": torch.zeros(len(t), dtype=torch.long), "boxes": t} for t in targets
        ]
        expected = reference({"logits": logits, "pred_boxes": pred}, labels)
        got = HungarianMatcher()(logits, pred, targets)
        for (p, t), (p_ref, t_ref) in zip(got, expected, strict=True):
            assert p.tolist() == p_ref.tolist() and t.tolist() == t_ref.tolist()
