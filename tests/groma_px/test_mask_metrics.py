"""Mask metrics on hand-made masks: RESMetric (cIoU / gIoU) and RegionMaskAPMetric (COCO AP)."""

import pickle

import numpy as np
import pytest
from mmengine.registry import DefaultScope
from mmengine.structures import BaseDataElement

from groma_px.data.masks import encode_mask
from groma_px.evaluation import RegionMaskAPMetric, RESMetric
from groma_px.registry import METRICS
from groma_px.structures import GroundedRegion, GroundedResponse, GroundedSpan

H, W = 4, 5


def _rect(y0, y1, x0, x1, height=H, width=W):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return encode_mask(mask)


# Two 4-pixel regions of a 4 x 5 image: top-left and bottom-right 2 x 2 squares.
GT = [_rect(0, 2, 0, 2), _rect(2, 4, 3, 5)]


def _response(*masks, score=0.9):
    """An answer whose k-th span cites one region with ``masks[k]`` (None: no mask)."""
    regions = tuple(
        GroundedRegion(box=(0.0, 0.0, 1.0, 1.0), score=score, source="proposer", mask=m)
        for m in masks
    )
    spans = tuple(GroundedSpan(0, 1, (k,)) for k in range(len(masks)))
    return GroundedResponse(text="x" * bool(masks), spans=spans, regions=regions)


def _sample(response, target, *, task="res", gt=GT, shape=(H, W), answer_regions=None, i=0):
    sample = BaseDataElement(
        metainfo=dict(
            task=task,
            sample_id=f"{task}/{i}",
            meta={"target": list(target)},
            answer_regions=list(target if answer_regions is None else answer_regions),
            gt_masks_rle=list(gt),
            ori_shape=shape,
        )
    )
    sample.pred_response = response
    return sample


def _run(metric, samples):
    metric.process(None, samples)
    return metric.evaluate(len(samples))


def test_res_ciou_giou_golden():
    samples = [
        _sample(_response(_rect(0, 2, 1, 3)), [0]),  # I 2, U 6: IoU 1/3
        _sample(_response(GT[1]), [1]),  # exact: I 4, U 4
        _sample(_response(), [0]),  # no citation: empty prediction, I 0, U 4
        _sample(_response(), []),  # empty prediction on an empty target: I 0, U 0, IoU 1
        _sample(_response(None), [1]),  # cited region without a mask: empty, I 0, U 4
        _sample(_response(GT[0], GT[1]), [0, 1]),  # first cited region only: I 4, U 8
        _sample(_response(GT[0]), [0], task="rec"),  # another task: not scored
    ]
    out = _run(RESMetric(), samples)
    assert out["res/cIoU"] == pytest.approx((2 + 4 + 4) / (6 + 4 + 4 + 0 + 4 + 8))
    assert out["res/gIoU"] == pytest.approx((1 / 3 + 1 + 0 + 1 + 0 + 0.5) / 6)
    assert out["res/no_region"] == pytest.approx(2 / 6)
    assert out["res/count"] == 6


def test_res_all_empty_scores_one_and_no_samples_report_nothing():
    assert _run(RESMetric(), [_sample(_response(), [])])["res/cIoU"] == 1.0
    assert _run(RESMetric(), [_sample(_response(GT[0]), [0], task="rec")]) == {}


def test_res_stores_only_counts():
    metric = RESMetric(tasks=("res", "rec"), dataset_name="toy")
    metric.process(None, [_sample(_response(GT[0]), [0])])
    assert metric.results == [{"intersection": 4, "union": 4, "no_region": False}]
    assert len(pickle.dumps(metric.results)) < 200
    assert set(metric.evaluate(1)) == {
        "res/toy/cIoU",
        "res/toy/gIoU",
        "res/toy/no_region",
        "res/toy/count",
    }


def test_res_errors_name_the_sample():
    wrong_size = _response(_rect(0, 2, 0, 2, height=5))
    with pytest.raises(ValueError, match=r"sample 'res/0': predicted mask of region 0: size"):
        _run(RESMetric(), [_sample(wrong_size, [0])])
    garbage = _response({"size": [H, W], "counts": "zzzz"})
    with pytest.raises(ValueError, match=r"sample 'res/0': predicted mask .* alphabet"):
        _run(RESMetric(), [_sample(garbage, [0])])
    with pytest.raises(ValueError, match=r"sample 'res/0': target region 1 has no ground-truth"):
        _run(RESMetric(), [_sample(_response(GT[0]), [1], gt=[GT[0], None])])
    with pytest.raises(KeyError, match="gt_masks_rle"):
        RESMetric().process(None, [{"task": "res", "meta": {"target": [0]}}])


# ------------------------------------------------------------------------------ mask AP
def _square(x0, size=10, hw=20):
    return _rect(5, 5 + size, x0, x0 + size, height=hw, width=hw)


def _ap_samples(pred_x0):
    """Three tasks, one 10 x 10 square each in a 20 x 20 image, predicted at ``pred_x0``."""
    return [
        _sample(_response(_square(pred_x0)), [0], task=task, gt=[_square(5)], shape=(20, 20), i=i)
        for i, task in enumerate(("rec", "res", "multi_grounding"))
    ]


def test_mask_ap_perfect_shifted_and_empty():
    perfect = _run(RegionMaskAPMetric(), _ap_samples(5))
    assert perfect == {"mask/AP": pytest.approx(1.0), "mask/AP50": 1.0, "mask/count": 3}
    # Shifted by 2 px: IoU 80 / 120 = 0.67 passes the thresholds 0.50 ... 0.65, 4 of 10.
    shifted = _run(RegionMaskAPMetric(), _ap_samples(7))
    assert shifted["mask/AP50"] == 1.0 and shifted["mask/AP"] == pytest.approx(0.4)
    no_citation = [_sample(_response(), [0], gt=[_square(5)], shape=(20, 20))]
    assert _run(RegionMaskAPMetric(), no_citation) == {
        "mask/AP": 0.0,
        "mask/AP50": 0.0,
        "mask/count": 1,
    }
    no_gt = [_sample(_response(_square(5)), [0], gt=[None], shape=(20, 20))]
    assert _run(RegionMaskAPMetric(), no_gt) == {"mask/count": 1}


def test_mask_ap_counts_a_maskless_citation_as_a_false_positive():
    # The higher-scored citation has no mask: a false positive ranked first halves precision.
    regions = (
        GroundedRegion(box=(0, 0, 1, 1), score=0.9, source="proposer"),
        GroundedRegion(box=(0, 0, 1, 1), score=0.5, source="proposer", mask=_square(5)),
    )
    response = GroundedResponse("ab", (GroundedSpan(0, 1, (0,)), GroundedSpan(1, 2, (1,))), regions)
    out = _run(RegionMaskAPMetric(), [_sample(response, [0], gt=[_square(5)], shape=(20, 20))])
    assert 0.0 < out["mask/AP"] < 1.0
    # Each reference region is one ground truth, however often the answer cites it.
    twice = _sample(
        _response(_square(5)), [0], answer_regions=[0, 0], gt=[_square(5)], shape=(20, 20)
    )
    assert _run(RegionMaskAPMetric(), [twice])["mask/AP"] == pytest.approx(1.0)


def test_mask_ap_does_not_depend_on_the_evaluation_order():
    """Two tied detections, one right and one wrong: ranked by sample, not by arrival (a
    grouped evaluation order or another rank count must not move AP)."""
    right = _sample(_response(_square(5), score=0.5), [0], gt=[_square(5)], shape=(20, 20), i=0)
    wrong = _sample(_response(_square(0), score=0.5), [0], gt=[_square(9)], shape=(20, 20), i=1)
    forward = _run(RegionMaskAPMetric(), [right, wrong])
    backward = _run(RegionMaskAPMetric(), [wrong, right])
    assert forward == backward and 0.0 < forward["mask/AP"] < 1.0


def test_mask_metrics_registered():
    with DefaultScope.overwrite_default_scope("groma_px"):
        assert isinstance(METRICS.build(dict(type="RESMetric")), RESMetric)
        ap = METRICS.build(dict(type="RegionMaskAPMetric"))
    assert isinstance(ap, RegionMaskAPMetric) and ap.tasks == ("rec", "res", "multi_grounding")


def test_synthetic_test_split_scores_perfect_with_reference_masks(tiny_cfg):
    """The tiny config's test pipeline packs masks, and its evaluator's mask metrics score an
    answer that cites the reference regions with their own masks as perfect."""
    from mmengine.evaluator import Evaluator

    from groma_px.registry import DATASETS

    with DefaultScope.overwrite_default_scope("groma_px"):
        dataset = DATASETS.build(tiny_cfg.test_dataloader.dataset)
        evaluator = Evaluator(
            [m for m in tiny_cfg.test_evaluator if m["type"] in ("RESMetric", "RegionMaskAPMetric")]
        )
    samples = []
    for i in range(len(dataset)):
        sample = dataset[i]["data_samples"]
        rles, cited = sample.gt_masks_rle, sample.answer_regions
        assert sample.gt_masks.shape == (len(rles), *sample.img_shape)
        assert sample.gt_mask_valid.all()  # every synthetic region has its mask
        sample.pred_response = _response(*(rles[r] for r in cited))
        samples.append(sample)
    assert {"res", "rec", "multi_grounding"} <= {s.task for s in samples}
    evaluator.process(samples)
    out = evaluator.evaluate(len(samples))
    assert out["res/cIoU"] == out["res/gIoU"] == 1.0 and out["res/no_region"] == 0.0
    assert out["mask/AP"] == pytest.approx(1.0) and out["mask/AP50"] == pytest.approx(1.0)
