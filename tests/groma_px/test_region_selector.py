"""RegionSelector: user regions always kept first, GT regions only in training, Groma's rule."""

import pytest
import torch

from groma_px.region_encoder import RegionSelection, RegionSelector
from groma_px.registry import MODELS
from groma_px.structures import RegionSource

PROPOSER, USER, GT = (
    int(RegionSource.PROPOSER),
    int(RegionSource.USER),
    int(RegionSource.GROUND_TRUTH),
)


def _grid_boxes(n: int) -> torch.Tensor:
    """``n`` disjoint normalised boxes on a row (no two overlap, so NMS keeps all)."""
    x0 = torch.arange(n, dtype=torch.float32) / n
    return torch.stack([x0, torch.zeros(n), x0 + 0.5 / n, torch.full((n,), 0.5)], dim=1)


def test_user_boxes_kept_first_and_mapped_to_themselves():
    proposals = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    scores = torch.tensor([0.99, 0.8])
    user = torch.tensor([[0.12, 0.1, 0.5, 0.52], [0.0, 0.0, 1.0, 1.0]])  # first overlaps prop 0
    sel = RegionSelector(top_k=3)(proposals, scores, user_boxes=user)
    assert isinstance(sel, RegionSelection) and sel.num_regions == 3
    torch.testing.assert_close(sel.boxes[:2], user)
    torch.testing.assert_close(sel.boxes[2], proposals[0])
    assert sel.scores[:2].tolist() == [1.0, 1.0]
    assert sel.source.tolist() == [USER, USER, PROPOSER]
    assert sel.ref_to_region.tolist() == [0, 1] and sel.ref_iou.tolist() == [1.0, 1.0]
    # top_k = number of user boxes: no proposal fits, the user boxes still do.
    only_user = RegionSelector(top_k=2)(proposals, scores, user_boxes=user)
    assert only_user.source.tolist() == [USER, USER]


def test_gt_boxes_join_only_in_training_with_use_gt():
    proposals, scores = _grid_boxes(2), torch.tensor([0.9, 0.8])
    gt = torch.tensor([[0.1, 0.6, 0.4, 0.9]])  # covered by no proposal
    selector = RegionSelector(top_k=5)
    infer = selector(proposals, scores, gt_boxes=gt)
    assert infer.source.tolist() == [PROPOSER, PROPOSER]
    assert infer.ref_to_region.tolist() == [0] and infer.ref_iou.tolist() == [0.0]  # tie -> row 0
    train = selector(proposals, scores, gt_boxes=gt, training=True)
    assert train.source.tolist() == [PROPOSER, PROPOSER, GT]
    torch.testing.assert_close(train.scores, torch.tensor([0.9, 0.8, 0.3]))
    assert train.ref_to_region.tolist() == [2] and train.ref_iou.tolist() == [1.0]
    no_gt = RegionSelector(top_k=5, use_gt=False)(proposals, scores, gt_boxes=gt, training=True)
    assert no_gt.source.tolist() == [PROPOSER, PROPOSER]


def test_overlapping_proposal_suppresses_gt_and_gt_maps_to_it():
    proposals = torch.tensor([[0.6, 0.6, 0.9, 0.9], [0.1, 0.1, 0.5, 0.5]])
    scores = torch.tensor([0.5, 0.9])
    gt = torch.tensor([[0.1, 0.1, 0.5, 0.52]])  # IoU 0.95 with proposal 1
    sel = RegionSelector(nms_thr=0.7)(proposals, scores, gt_boxes=gt, training=True)
    assert sel.source.tolist() == [PROPOSER, PROPOSER]
    torch.testing.assert_close(sel.boxes, proposals[[1, 0]])
    assert sel.ref_to_region.tolist() == [0]
    assert sel.ref_iou.item() == pytest.approx(0.4 * 0.4 / (0.4 * 0.42))


def test_score_threshold_top_k_and_order():
    proposals = _grid_boxes(5)
    scores = torch.tensor([0.01, 0.5, 0.9, 0.3, 0.04])
    sel = RegionSelector(score_thr=0.05, top_k=2)(proposals, scores)
    torch.testing.assert_close(sel.boxes, proposals[[2, 1]])
    torch.testing.assert_close(sel.scores, torch.tensor([0.9, 0.5]))
    everything = RegionSelector(score_thr=0.05, top_k=10)(proposals, scores)
    torch.testing.assert_close(everything.scores, torch.tensor([0.9, 0.5, 0.3]))
    # One user box takes one of the top_k tokens.
    user = torch.tensor([[0.0, 0.6, 1.0, 1.0]])
    with_user = RegionSelector(score_thr=0.05, top_k=2)(proposals, scores, user_boxes=user)
    torch.testing.assert_close(with_user.boxes, torch.cat([user, proposals[[2]]]))


def test_selection_is_deterministic_with_ties_by_index():
    proposals = _grid_boxes(6)
    scores = torch.tensor([0.5, 0.7, 0.5, 0.7, 0.2, 0.5])
    selector = RegionSelector(shuffle=True)
    first = selector(proposals, scores)  # shuffle is off outside training
    again = selector(proposals, scores)
    torch.testing.assert_close(first.boxes, proposals[[1, 3, 0, 2, 5, 4]])
    torch.testing.assert_close(first.boxes, again.boxes)


def test_shuffle_only_in_training_and_reproducible():
    proposals, scores = _grid_boxes(8), torch.linspace(0.9, 0.2, 8)
    user = torch.tensor([[0.0, 0.6, 0.3, 0.9]])
    gt = proposals[[5]]
    plain = RegionSelector(shuffle=False)(proposals, scores, user_boxes=user, training=True)
    selector = RegionSelector(shuffle=True)
    kwargs = dict(user_boxes=user, gt_boxes=gt, training=True)
    a = selector(proposals, scores, **kwargs, generator=torch.Generator().manual_seed(0))
    b = selector(proposals, scores, **kwargs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.boxes, b.boxes)
    assert not torch.equal(a.boxes, plain.boxes)
    assert sorted(map(tuple, a.boxes.tolist())) == sorted(map(tuple, plain.boxes.tolist()))
    user_row, gt_row = a.ref_to_region.tolist()
    torch.testing.assert_close(a.boxes[user_row], user[0])
    assert a.source[user_row] == USER and a.scores[user_row] == 1.0
    torch.testing.assert_close(a.boxes[gt_row], gt[0])
    assert a.ref_iou.tolist() == [1.0, 1.0]


def test_too_many_user_boxes_raises():
    user = _grid_boxes(3)
    with pytest.raises(ValueError, match=r"more user regions \(3\) than region tokens"):
        RegionSelector(top_k=2)(torch.zeros(0, 4), torch.zeros(0), user_boxes=user)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(proposal_boxes=torch.tensor([[0.0, 0.0, 1.2, 0.5]])), "proposal_boxes"),
        (dict(proposal_boxes=torch.zeros(1, 3)), "proposal_boxes"),
        (dict(proposal_scores=torch.tensor([0.5, 0.5])), "proposal_scores"),
        (dict(proposal_scores=torch.tensor([float("nan")])), "proposal_scores"),
        (dict(user_boxes=torch.tensor([[0.5, 0.0, 0.4, 0.5]])), "user_boxes"),
        (dict(gt_boxes=torch.tensor([[0.0, float("nan"), 0.4, 0.5]])), "gt_boxes"),
        (dict(gt_boxes=torch.tensor([[0.0, -0.1, 0.4, 0.5]])), "gt_boxes"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, name):
    args = dict(proposal_boxes=torch.tensor([[0.1, 0.1, 0.4, 0.4]]), proposal_scores=torch.ones(1))
    args.update(kwargs)
    boxes, scores = args.pop("proposal_boxes"), args.pop("proposal_scores")
    with pytest.raises(ValueError, match=name):
        RegionSelector()(boxes, scores, **args)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="top_k"):
        RegionSelector(top_k=0)
    with pytest.raises(ValueError, match="gt_score"):
        RegionSelector(score_thr=0.5, gt_score=0.3)
    with pytest.raises(ValueError, match=r"test_cfg: unknown keys \['top_k'\]"):
        RegionSelector(test_cfg=dict(top_k=10))
    with pytest.raises(ValueError, match="test_cfg.nms_thr"):
        RegionSelector(test_cfg=dict(nms_thr=1.5))
    with pytest.raises(ValueError, match="^score_thr"):
        RegionSelector(score_thr=-0.1)


def test_test_cfg_rule_applies_only_outside_training():
    # Box 1 overlaps box 0 at IoU 0.6; box 2 scores 0.07.
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.3], [0.6, 0.6, 0.9, 0.9]])
    scores = torch.tensor([0.9, 0.8, 0.07])
    selector = RegionSelector(
        score_thr=0.1, nms_thr=0.5, use_gt=False, test_cfg=dict(score_thr=0.05, nms_thr=0.7)
    )
    train = selector(boxes, scores, training=True)
    torch.testing.assert_close(train.boxes, boxes[:1])
    test = selector(boxes, scores)
    torch.testing.assert_close(test.boxes, boxes)
    assert selector.test_cfg == {"score_thr": 0.05, "nms_thr": 0.7}
    assert selector.min_score_thr == 0.05
    # Only one key overridden: the other is the training rule's.
    only_nms = RegionSelector(score_thr=0.1, nms_thr=0.5, test_cfg=dict(nms_thr=0.7))
    torch.testing.assert_close(only_nms(boxes, scores).boxes, boxes[:2])
    assert only_nms.test_cfg == {"score_thr": 0.1, "nms_thr": 0.7}


def test_zero_proposals():
    empty_boxes, empty_scores = torch.zeros(0, 4), torch.zeros(0)
    nothing = RegionSelector()(empty_boxes, empty_scores)
    assert nothing.boxes.shape == (0, 4) and nothing.ref_to_region.shape == (0,)
    gt = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    infer = RegionSelector()(empty_boxes, empty_scores, gt_boxes=gt)
    assert infer.num_regions == 0
    assert infer.ref_to_region.tolist() == [-1] and infer.ref_iou.tolist() == [0.0]
    user = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    train = RegionSelector()(empty_boxes, empty_scores, user_boxes=user, gt_boxes=gt, training=True)
    assert train.source.tolist() == [USER, GT] and train.ref_to_region.tolist() == [0, 1]


def test_registered_in_groma_px_models():
    # module_dict, not build(): a build imports every registry location (seconds of imports).
    assert MODELS.module_dict["RegionSelector"] is RegionSelector
