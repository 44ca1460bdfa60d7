"""SetCriterion: parity with transformers' Deformable DETR loss, empty images, gradients.

Parity mapping (transformers ``DeformableDetrImageLoss(losses=["labels", "boxes"],
num_classes=1, focal_alpha=0.25)`` with ``DeformableDetrHungarianMatcher(class_cost=2,
bbox_cost=5, giou_cost=2)``):
transformers' ``loss_ce`` is ``sigmoid_focal_loss(...).mean(1).sum() / num_boxes * num_queries``,
i.e. the focal loss summed over all B * N * C logits / num_boxes -- our unweighted focal term. Its
``loss_bbox`` / ``loss_giou`` are the same sums / num_boxes as ours. transformers returns them
unweighted, so ``loss_focal = 2 * loss_ce``, ``loss_l1 = 5 * loss_bbox``,
``loss_giou = 2 * loss_giou`` with our default ``loss_weights``.
"""

import pytest
import torch

from region_proposer.losses import SetCriterion
from region_proposer.matching import HungarianMatcher

WEIGHTS = dict(loss_focal=2.0, loss_l1=5.0, loss_giou=2.0)


def random_case(seed: int, num_targets: list[int], num_queries: int = 12):
    """Random logits (B, N, 1), predicted and target cxcywh boxes inside the unit square."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(n: int) -> torch.Tensor:
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        return torch.cat([centre, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], dim=1)

    logits = torch.randn(len(num_targets), num_queries, 1, generator=gen) * 2
    pred = torch.stack([boxes(num_queries) for _ in num_targets])
    return logits, pred, [boxes(m) for m in num_targets]


def make_criterion(**kwargs) -> SetCriterion:
    return SetCriterion(matcher=dict(type="HungarianMatcher"), **kwargs)


@pytest.mark.parametrize("sizes", [[4, 0, 7, 12], [3, 5], [0, 2]])
def test_matches_transformers_deformable_detr(sizes):
    module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    matcher = module.DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    reference = module.DeformableDetrImageLoss(
        matcher=matcher, num_classes=1, focal_alpha=0.25, losses=["labels", "boxes"]
    )
    logits, pred, targets = random_case(len(sizes) * 7 + sizes[0], sizes)
    labels = [{"class_labels": torch.zeros(len(t), dtype=torch.long), "boxes": t} for t in targets]
    expected = reference({"logits": logits, "pred_boxes": pred}, labels)
    got = make_criterion()(logits, pred, targets)
    torch.testing.assert_close(got["loss_focal"], WEIGHTS["loss_focal"] * expected["loss_ce"])
    torch.testing.assert_close(got["loss_l1"], WEIGHTS["loss_l1"] * expected["loss_bbox"])
    torch.testing.assert_close(got["loss_giou"], WEIGHTS["loss_giou"] * expected["loss_giou"])


def test_perfect_boxes_have_zero_box_losses():
    _, _, targets = random_case(0, [3])
    pred = torch.cat([targets[0], torch.tensor([[0.5, 0.5, 0.1, 0.1]])])[None]
    losses = make_criterion()(torch.zeros(1, 4, 1), pred, targets)
    assert float(losses["loss_l1"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-6)


def test_batch_without_objects_pushes_scores_down_and_stays_connected():
    logits, pred, _ = random_case(1, [0, 0])
    logits.requires_grad_(True)
    pred.requires_grad_(True)
    losses = make_criterion()(logits, pred, [torch.zeros(0, 4), torch.zeros(0, 4)])
    values = {name: float(loss.detach()) for name, loss in losses.items()}
    assert values["loss_focal"] > 0 and values["loss_l1"] == 0 and values["loss_giou"] == 0
    assert losses["loss_l1"].requires_grad and losses["loss_giou"].requires_grad
    sum(losses.values()).backward()
    assert bool((logits.grad > 0).all())  # every score is pushed down
    assert pred.grad is not None and float(pred.grad.abs().sum()) == 0


def test_gradients_reach_logits_and_boxes():
    logits, pred, targets = random_case(2, [3, 0, 5])
    logits.requires_grad_(True)
    pred.requires_grad_(True)
    sum(make_criterion()(logits, pred, targets).values()).backward()
    assert float(logits.grad.abs().sum()) > 0
    matched = pred.grad.abs().sum(-1) > 0  # (B, N): only matched queries get box gradients
    assert matched.sum(-1).tolist() == [3, 0, 5]


def test_normaliser_counts_boxes_and_accepts_override():
    logits, pred, targets = random_case(3, [2, 4])
    criterion = make_criterion()
    local = criterion(logits, pred, targets)
    halved = criterion(logits, pred, targets, num_boxes=12.0)
    for name in local:
        torch.testing.assert_close(halved[name], local[name] * 6 / 12)
    clamped = criterion(logits, pred, targets, num_boxes=torch.tensor(0.25))
    torch.testing.assert_close(clamped["loss_l1"], local["loss_l1"] * 6)


def test_loss_weights_and_matcher_instance():
    logits, pred, targets = random_case(4, [3])
    base = make_criterion()(logits, pred, targets)
    weights = dict(loss_focal=1.0, loss_l1=0.0, loss_giou=4.0)
    other = SetCriterion(matcher=HungarianMatcher(), loss_weights=weights)(logits, pred, targets)
    torch.testing.assert_close(other["loss_focal"], base["loss_focal"] / 2)
    assert float(other["loss_l1"]) == 0
    torch.testing.assert_close(other["loss_giou"], base["loss_giou"] * 2)
    with pytest.raises(ValueError, match="unknown"):
        make_criterion(loss_weights=dict(WEIGHTS, loss_ce=1.0))
