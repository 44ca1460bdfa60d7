"""Chat metrics on hand-built prediction samples: REC, captions, grounded captions, counting."""

import pickle

import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.structures import BaseDataElement

from groma_px.evaluation import (
    CountingMetric,
    GroundedCaptionMetric,
    RECMetric,
    RegionCaptionMetric,
    greedy_matches,
    parse_count,
    strip_markup,
)
from groma_px.registry import METRICS
from groma_px.structures import GroundedRegion, GroundedResponse, GroundedSpan

BOX = (0.0, 0.0, 10.0, 10.0)


def _response(*parts):
    """GroundedResponse from plain strings and (phrase, [box, ...]) citations, in text order."""
    text, spans, regions = "", [], []
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        phrase, boxes = part
        ids = tuple(range(len(regions), len(regions) + len(boxes)))
        regions += [GroundedRegion(box=tuple(b), score=0.9, source="proposer") for b in boxes]
        spans.append(GroundedSpan(start=len(text), end=len(text) + len(phrase), region_ids=ids))
        text += phrase
    return GroundedResponse(text=text, spans=tuple(spans), regions=tuple(regions))


def _sample(task, response, *, gt=(BOX,), kept=(BOX,), meta=None, answer="", answer_regions=()):
    sample = BaseDataElement(
        metainfo=dict(
            task=task,
            sample_id=f"{task}/0",
            meta=meta if meta is not None else {"target": [0]},
            answer=answer,
            answer_regions=list(answer_regions),
        )
    )
    sample.gt_boxes_original = torch.tensor(gt, dtype=torch.float32).reshape(-1, 4)
    sample.kept_boxes = torch.tensor(kept, dtype=torch.float32).reshape(-1, 4)
    sample.pred_response = response
    return sample


def _run(metric, samples):
    metric.process(None, samples)
    return metric.evaluate(len(samples))


def _rec(*parts, gt=(BOX,), kept=(BOX,)):
    return _sample("rec", _response(*parts), gt=gt, kept=kept)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<p>the red star</p><roi><ground_box></roi>", "the red star"),
        (
            "The image shows <p>a circle</p><roi><ground_box></roi> on grey.",
            "The image shows a circle on grey.",
        ),
        ("<p>two stars</p> <roi><ground_box><ground_box></roi> .", "two stars."),
        ("What is <refer_box> next to <refer_feat>?", "What is next to?"),
        ("a large green circle", "a large green circle"),
    ],
)
def test_strip_markup(text, expected):
    assert strip_markup(text) == expected


def test_rec_hit_miss_no_region():
    samples = [
        _rec(("the star", [(1, 1, 10, 10)])),  # IoU 0.81: hit
        _rec(("the star", [(5, 5, 20, 20)])),  # IoU 25 / 300: miss
        _rec("I cannot find it."),  # no region: miss
        _rec(("the star", [(1, 0, 10, 10)]), kept=()),  # hit although nothing was kept
    ]
    out = _run(RECMetric(), samples)
    assert out == {
        "rec/acc@0.5": 0.5,
        "rec/ceiling": 0.75,
        "rec/no_region": 0.25,
        "rec/count": 4,
    }


def test_rec_splits_accuracy_by_relational_expressions_when_meta_says():
    def rec(box, relational):
        meta = {"target": [0], "relational": relational}
        return _sample("rec", _response(("the star", [box])), meta=meta)

    hit, miss = (1, 1, 10, 10), (5, 5, 20, 20)
    out = _run(RECMetric(), [rec(hit, True), rec(miss, True), rec(miss, True), rec(hit, False)])
    assert out["rec/acc@0.5"] == 0.5
    assert out["rec/relational/acc@0.5"] == pytest.approx(1 / 3)
    assert out["rec/plain/acc@0.5"] == 1.0
    assert (out["rec/relational/count"], out["rec/plain/count"]) == (3, 1)
    # Without the flag on every sample there is no split.
    out = _run(RECMetric(), [rec(hit, True), _rec(("the star", [hit]))])
    assert not any("relational" in key or "plain" in key for key in out)


def test_rec_scores_only_the_first_cited_region():
    far, near = (50, 50, 60, 60), (0, 0, 10, 10)
    samples = [
        _rec(("a", [far, near]), " and ", ("b", [near])),  # first region of the first span
        _rec("the ", ("star", [near]), " left of ", ("c", [far])),  # first span comes first
    ]
    out = _run(RECMetric(), samples)
    assert out["rec/acc@0.5"] == 0.5


def test_rec_first_region_follows_span_order_as_parsed():
    # "<p>the man with <p>a hat</p><roi><r1></roi></p><roi><r0></roi>": the nested phrase is
    # grounded (listed) first, so its region is the first cited one, as in the raw answer.
    hat, man = (50, 50, 60, 60), (0, 0, 10, 10)
    text = "the man with a hat"
    response = GroundedResponse(
        text=text,
        spans=(GroundedSpan(13, 18, (0,)), GroundedSpan(0, 18, (1,))),
        regions=(
            GroundedRegion(box=hat, score=0.9, source="proposer"),
            GroundedRegion(box=man, score=0.9, source="proposer"),
        ),
    )
    assert _run(RECMetric(), [_sample("rec", response)])["rec/acc@0.5"] == 0.0
    # A span citing nothing (a phrase without <roi>) is skipped.
    skipped = GroundedResponse(
        text=text, spans=(GroundedSpan(0, 3, ()),) + response.spans[1:], regions=response.regions
    )
    assert _run(RECMetric(), [_sample("rec", skipped)])["rec/acc@0.5"] == 1.0


def test_rec_iou_of_exactly_half_is_a_miss_and_threshold_renames_key():
    gt = ((0, 0, 10, 20),)
    half = _rec(("x", [(0, 0, 10, 10)]), gt=gt, kept=((0, 0, 10, 10),))  # IoU 100 / 200
    out = _run(RECMetric(), [half])
    assert out["rec/acc@0.5"] == 0.0 and out["rec/ceiling"] == 0.0
    out = _run(RECMetric(iou_thr=0.4), [half])
    assert out["rec/acc@0.4"] == 1.0 and "rec/acc@0.5" not in out


def test_rec_ceiling_uses_target_index():
    gt = ((50, 50, 60, 60), (0, 0, 10, 10))
    sample = _sample(
        "rec", _response(("x", [(0, 0, 10, 10)])), gt=gt, kept=gt[:1], meta={"target": [1]}
    )
    out = _run(RECMetric(), [sample])
    assert out["rec/acc@0.5"] == 1.0 and out["rec/ceiling"] == 0.0


def _caption(pred, answer):
    return _sample("region_caption", GroundedResponse(text=pred), answer=answer)


CAPTIONS = [
    "a large green circle on the left",
    "a small red star near the top edge",
    "a blue square partly hidden behind a circle",
]


def test_caption_identical_beats_mismatched():
    identical = _run(RegionCaptionMetric(), [_caption(c.upper() + ".", c) for c in CAPTIONS])
    assert identical["caption/BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert identical["caption/BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    wrong = [_caption(CAPTIONS[0], CAPTIONS[1])] + [_caption(c, c) for c in CAPTIONS[1:]]
    mismatched = _run(RegionCaptionMetric(), wrong)
    assert identical["caption/CIDEr"] > mismatched["caption/CIDEr"] > 0
    assert mismatched["caption/BLEU-4"] < 1.0
    keys = ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "count")
    assert set(identical) == {f"caption/{k}" for k in keys}


def test_caption_reference_markup_is_removed_and_empty_prediction_scores_zero():
    answer = "<p>a small red star</p><roi><ground_box></roi> near the top edge"
    samples = [_caption("a small red star near the top edge", answer), _caption("", CAPTIONS[0])]
    out = _run(RegionCaptionMetric(), samples)
    assert 0.0 < out["caption/BLEU-1"] < 1.0
    out = _run(RegionCaptionMetric(), samples[:1])
    assert out["caption/BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def _gcap(parts, gt, answer_regions):
    return _sample(
        "grounded_caption", _response(*parts), gt=gt, answer_regions=answer_regions, meta={}
    )


def test_grounded_caption_precision_recall_f1():
    a, b, c, d = (0, 0, 10, 10), (20, 0, 30, 10), (0, 20, 10, 30), (20, 20, 30, 30)
    samples = [
        # 3 citations, 2 references: a twice (one-to-one: the repeat is a false positive), b once.
        _gcap([("x", [(0, 0, 10, 9)]), " ", ("y", [(0, 0, 9, 10), b])], (a, b), [0, 1]),
        # 1 citation (c), 2 references (c, d); d is a record region cited by the reference only.
        _gcap([("z", [c])], (a, c, d), [1, 2]),
        # 1 citation, no reference citation.
        _gcap([("w", [a])], (a,), []),
    ]
    out = _run(GroundedCaptionMetric(), samples)
    # tp = 2 + 1 + 0, predictions = 3 + 1 + 1, references = 2 + 2 + 0.
    assert out["gcap/precision"] == pytest.approx(3 / 5)
    assert out["gcap/recall"] == pytest.approx(3 / 4)
    assert out["gcap/f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert out["gcap/count"] == 3


def test_greedy_matches_is_greedy_by_iou_and_half_counts():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert greedy_matches(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), ref, 0.5) == 1  # IoU 0.5
    pred = torch.tensor([[0.0, 0.0, 10.0, 19.0], [0.0, 6.0, 10.0, 20.0]])
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 14.0]])
    # IoU: p0-r0 0.95, p0-r1 0.74, p1-r0 0.7, p1-r1 0.4. Highest first takes p0-r0, which leaves
    # p1 unmatched (a maximum matching, p0-r1 + p1-r0, would find 2).
    assert greedy_matches(pred, ref, 0.5) == 1
    assert greedy_matches(pred[:0], ref, 0.5) == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("There are 3 stars.", 3),
        ("Three.", 3),
        ("I see twenty circles and 2 stars.", 20),
        ("There is one red object, someone said 7.", 1),
        ("There are 12 crosses.", 12),
        ("There are none.", None),
        ("Someone hid them.", None),
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_counting_accuracy():
    samples = [
        _sample("counting", GroundedResponse(text=t), meta={"count": n})
        for t, n in [("There are 3 stars.", 3), ("Five.", 5), ("two", 3), ("Many.", 0)]
    ]
    out = _run(CountingMetric(), samples)
    assert out == {"count/acc": 0.5, "count/unparsed": 0.25, "count/count": 4}


@pytest.mark.parametrize(
    "metric", [RECMetric, RegionCaptionMetric, GroundedCaptionMetric, CountingMetric]
)
def test_metric_without_its_task_returns_empty(metric):
    other = "conversation"
    assert _run(metric(), [_sample(other, GroundedResponse(text="3"), meta={"count": 3})]) == {}
    assert _run(metric(), []) == {}


def test_evaluator_flat_keys_and_picklable_results():
    rec = METRICS.build(dict(type="RECMetric", dataset_name="synthetic"))
    count = METRICS.build(dict(type="CountingMetric"))
    evaluator = Evaluator([rec, count, RegionCaptionMetric()])
    samples = [
        _rec(("the star", [BOX])),
        _sample("counting", GroundedResponse(text="2"), meta={"count": 2}),
    ]
    evaluator.process(data_samples=samples, data_batch=None)
    pickle.dumps([rec.results, count.results])
    # one entry per sample ({} for other tasks), so distributed padding can be cut off
    assert rec.results == [{"hit": True, "ceiling": True, "no_region": False}, {}]
    out = evaluator.evaluate(len(samples))
    assert out == {
        "rec/synthetic/acc@0.5": 1.0,
        "rec/synthetic/ceiling": 1.0,
        "rec/synthetic/no_region": 0.0,
        "rec/synthetic/count": 1,
        "count/acc": 1.0,
        "count/unparsed": 0.0,
        "count/count": 1,
    }
