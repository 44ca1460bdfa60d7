"""ProposalRecallMetric: AR via pycocotools (golden cases) and region-set recall."""

import math

import pytest
import torch

from region_proposer.evaluation import ProposalRecallMetric
from region_proposer.selection import select_regions


def _sample(gt, boxes, scores, shape=(100, 100)):
    return {
        "ori_shape": shape,
        "gt_original": torch.tensor(gt, dtype=torch.float32).reshape(-1, 4),
        "pred_instances": {
            "bboxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
        },
    }


def _run(samples, **kwargs):
    metric = ProposalRecallMetric(**kwargs)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def test_perfect_proposals():
    out = _run(
        [
            _sample(
                [[10, 10, 50, 50], [60, 60, 90, 95]],
                [[60, 60, 90, 95], [10, 10, 50, 50]],
                [0.9, 0.8],
            )
        ]
    )
    assert out["AR@1"] == pytest.approx(0.5) and out["AR@10"] == pytest.approx(1.0)
    assert out["region_set_recall@0.5"] == 1.0 and out["num_kept"] == 2


def test_ar_counts_iou_thresholds():
    # IoU of [0,0,10,10] with [0,0,10,7.2] is 0.72: recalled at 0.50, 0.55, ..., 0.70 -> 5 of 10.
    out = _run([_sample([[0, 0, 10, 10]], [[0, 0, 10, 7.2]], [0.5])])
    assert out["AR@100"] == pytest.approx(0.5)
    assert out["region_set_recall@0.5"] == 1.0


def test_selection_rule_limits_region_set_recall():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9.9], [50, 50, 60, 60]]
    scores = [0.9, 0.8, 0.3]
    assert _run([_sample(gt, boxes, scores)], top_k=1)["region_set_recall@0.5"] == 0.5
    assert _run([_sample(gt, boxes, scores)], score_thr=0.5)["region_set_recall@0.5"] == 0.5
    out = _run([_sample(gt, boxes, scores)], top_k=2, nms_thr=0.7)
    assert out["region_set_recall@0.5"] == 1.0  # NMS removes the duplicate, top-2 keeps both
    assert _run([_sample(gt, boxes, scores)], top_k=2, nms_thr=None)["region_set_recall@0.5"] == 0.5


def test_empty_cases_and_prefix():
    out = _run([_sample([[0, 0, 10, 10]], [], [])])
    assert out["AR@100"] == 0.0 and out["region_set_recall@0.5"] == 0.0
    out = _run([_sample([], [[0, 0, 5, 5]], [0.4])])
    assert math.isnan(out["AR@100"]) and math.isnan(out["region_set_recall@0.5"])
    metric = ProposalRecallMetric(dataset_name="synthetic")
    assert metric.prefix == "proposer/synthetic"


def test_select_regions_order_and_errors():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=torch.float32)
    keep = select_regions(boxes, torch.tensor([0.5, 0.9, 0.5]), nms_thr=0.7, top_k=None)
    assert keep.tolist() == [1, 0]
    keep = select_regions(boxes, torch.tensor([0.5, 0.9, 0.5]), nms_thr=None, top_k=None)
    assert keep.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="non-finite"):
        select_regions(boxes, torch.tensor([0.5, float("nan"), 0.5]))
