"""Region-text alignment: query drawing, the multi-positive loss, packing and the model loss."""

from __future__ import annotations

import math

import pytest
import torch

from groma_px.data.chat_transforms import region_labels
from groma_px.models.region_text import (
    RegionTextAlignment,
    batch_queries,
    match_regions,
    multi_positive_nce,
)

LABELS = [
    ("small", "red", "star"),
    ("large", "red", "star"),
    ("small", "blue", "circle"),
    ("small", "red", None),  # no category: the noun becomes "object"
]


def test_match_regions_takes_the_best_covered_record_region_above_the_threshold():
    gt = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]])
    kept = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.55, 0.5, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1]])
    assert match_regions(gt, kept, 0.5).tolist() == [0, 1, -1]
    assert match_regions(gt[:0], kept, 0.5).tolist() == [-1, -1, -1]
    assert match_regions(gt, kept[:0], 0.5).shape == (0,)


def test_full_queries_name_every_field_and_their_look_alikes_are_positives():
    align = RegionTextAlignment(drop_prob=0.0)
    match = torch.tensor([2, 0, -1, 1, 0, 3])  # kept rows -> record regions; rows 1, 4 duplicate 0
    queries = dict(align.queries(LABELS, match))
    assert queries == {
        "the small red star": [1, 4],
        "the large red star": [3],
        "the small blue circle": [0],
        "the small red object": [1, 4, 5],  # regions 0 and 3 agree on size and colour
    }


def test_dropped_fields_widen_the_positives_and_the_noun_falls_back():
    align = RegionTextAlignment(drop_prob=0.9, prefix="")
    match = torch.tensor([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(200):
        for text, rows in align.queries(LABELS[:3], match, generator):
            seen.setdefault(text, rows)
    # at least one field always stays; a lone colour reads "red object" and covers both stars
    assert all(text for text in seen)
    assert seen["red object"] == [0, 1]
    assert seen["star"] == [0, 1]
    assert seen["small object"] == [0, 2]
    assert seen["circle"] == [2]
    assert "object" not in seen


def test_queries_skip_uncovered_and_unlabelled_regions():
    align = RegionTextAlignment(drop_prob=0.0)
    assert align.queries([(None, None, None), LABELS[0]], torch.tensor([0, -1])) == []
    with pytest.raises(ValueError, match="record region 5"):
        align.queries(LABELS, torch.tensor([5]))


@pytest.mark.parametrize(
    "kwargs",
    [dict(weight=0.0), dict(drop_prob=1.0), dict(drop_prob=-0.1), dict(iou_thr=0.0)],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="region_text_loss"):
        RegionTextAlignment(**kwargs)


def test_multi_positive_nce_is_minus_log_of_the_positive_softmax_mass():
    scores = torch.tensor([[1.0, 2.0, 3.0, 50.0], [0.5, -1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    positive = torch.tensor([[True, False, True, False], [False, True, False, False]])
    loss, accuracy = multi_positive_nce(scores, valid, positive)
    p0 = (math.exp(1) + math.exp(3)) / (math.exp(1) + math.exp(2) + math.exp(3))
    p1 = math.exp(-1) / (math.exp(0.5) + math.exp(-1) + 2)
    assert loss.item() == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-6)
    assert accuracy.item() == 0.5  # query 0's best valid column (2) is positive; query 1's is not
    with pytest.raises(ValueError, match="positive"):
        multi_positive_nce(scores, valid, positive & ~valid)


def test_region_labels_read_dotted_fields():
    region = {"category": "star", "attributes": {"color": "red", "occluded": True}}
    fields = ("attributes.size", "attributes.color", "category")
    assert region_labels(region, fields) == (None, "red", "star")
    with pytest.raises(ValueError, match=r"sample 's1': regions\[3\]\.attributes\.occluded"):
        region_labels(region, ("attributes.occluded",), sample_id="s1", index=3)


def test_packed_samples_carry_region_labels(make_batch):
    sample = make_batch([0])["data_samples"][0]
    labels = sample.metainfo["region_labels"]
    assert len(labels) == len(sample.gt_boxes)
    sizes, colours, shapes = zip(*labels, strict=True)
    assert set(sizes) <= {"small", "medium", "large"}
    assert all(isinstance(c, str) for c in colours) and all(isinstance(s, str) for s in shapes)


def test_model_loss_trains_the_phrase_query_and_the_region_encoder(
    build_model, make_batch, single_thread
):
    model = build_model()
    batch = model.data_preprocessor(make_batch([0, 1, 2, 3]), True)
    losses = model(**batch, mode="loss")
    assert torch.isfinite(losses["loss_region_text"]) and losses["loss_region_text"] > 0
    assert 0.0 <= losses["region_text_acc"].item() <= 1.0
    losses["loss_region_text"].backward()
    for module in (model.region_pointer.phrase_query, model.region_encoder.head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.region_pointer.query.weight.grad is None  # the hidden-state query is not used


def test_model_loss_needs_labels_and_a_phrase_query(build_model, make_batch):
    model = build_model()
    batch = model.data_preprocessor(make_batch([0]), True)
    del batch["data_samples"][0].region_labels
    with pytest.raises(ValueError, match="region_label_fields"):
        model(**batch, mode="loss")
    with pytest.raises(ValueError, match="region_text_loss .*phrase_query=True"):
        build_model(region_pointer=dict(phrase_query=False), describe_head=None)
    with pytest.raises(ValueError, match="describe_head .*phrase_query=True"):
        build_model(
            region_pointer=dict(phrase_query=False), region_text_loss=None, describe_head={}
        )


def test_batch_negatives_take_positives_from_every_image():
    align = RegionTextAlignment(drop_prob=0.0)
    batch = RegionTextAlignment(drop_prob=0.0, negatives="batch")
    other = [("small", "red", "star"), ("large", "blue", "hexagon")]
    matched = [(LABELS[:3], torch.tensor([2, 0, -1])), (other, torch.tensor([-1, 1, 0]))]
    texts, image_index, positives = batch_queries(align, matched)
    assert texts == [
        "the small red star",
        "the small blue circle",
        "the small red star",
        "the large blue hexagon",
    ]
    assert image_index == [0, 0, 1, 1]
    assert positives == [[1], [0], [2], [1]]  # rows of the own image
    texts_b, image_index_b, positives_b = batch_queries(batch, matched)
    assert (texts_b, image_index_b) == (texts, image_index)
    # rows of the batch (image 1 starts at row 3): both small red stars are positives of each
    assert positives_b == [[1, 5], [0], [1, 5], [4]]
    with pytest.raises(ValueError, match="negatives"):
        RegionTextAlignment(negatives="dataset")


def test_model_loss_with_batch_negatives_scores_the_whole_batch_and_trains_the_encoder(
    build_model, make_batch, single_thread
):
    torch.manual_seed(0)
    model = build_model()
    batch = model.data_preprocessor(make_batch([0, 1, 2, 3]), True)
    torch.manual_seed(1)
    image = model(**batch, mode="loss")["loss_region_text"]
    model.region_text = RegionTextAlignment(negatives="batch")
    torch.manual_seed(1)  # the same field subsets
    losses = model(**batch, mode="loss")
    wide = losses["loss_region_text"]
    # the same queries, each against a superset of its negatives (and of its positives)
    assert torch.isfinite(wide) and wide.item() != pytest.approx(image.item())
    wide.backward()
    grads = [p.grad for p in model.region_encoder.head.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
