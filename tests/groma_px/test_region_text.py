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
    positive_rows,
)
from region_proposer.proposers import GroundTruthProposer

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
    texts, image_index, positives, relational = batch_queries(align, matched)
    assert relational == [False] * 4
    assert texts == [
        "the small red star",
        "the small blue circle",
        "the small red star",
        "the large blue hexagon",
    ]
    assert image_index == [0, 0, 1, 1]
    assert positives == [[1], [0], [2], [1]]  # rows of the own image
    texts_b, image_index_b, positives_b, _ = batch_queries(batch, matched)
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


# ------------------------------------------------------------------------------ relational queries
# Record boxes (xyxy) of LABELS: the two red stars left and right of the blue circle, the red
# object below the circle.
BOXES = torch.tensor(
    [[0.0, 0.4, 0.2, 0.6], [0.8, 0.4, 1.0, 0.6], [0.4, 0.4, 0.6, 0.6], [0.45, 0.8, 0.55, 0.9]]
)


def test_relational_queries_name_an_anchor_and_keep_the_regions_in_that_relation():
    align = RegionTextAlignment(drop_prob=0.0, relational_prob=1.0)
    match = torch.tensor([0, 1, 2, 3])  # kept row k covers record region k
    seen = {}
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        for text, rows in align.queries(LABELS, match, generator, boxes=BOXES):
            seen[text] = rows
    # Every query relates its region to another, whose words name it alone.
    assert seen["the small red star to the left of the small blue circle"] == [0]
    assert seen["the large red star to the right of the small blue circle"] == [1]
    assert seen["the small red object below the small blue circle"] == [3]
    # Both small red regions stand left of the large star.
    assert seen["the small red object to the left of the large red star"] == [0, 3]
    assert not any(t.startswith("the small red star to the right") for t in seen)
    # "the small red object" names two regions, so it is never an anchor; a query whose drawn
    # anchor cannot be named alone stays plain.
    assert not any(t.endswith("of the small red object") for t in seen)
    assert seen["the small red star"] == [0]


def test_relational_positives_follow_the_relation_not_only_the_words():
    match = torch.tensor([0, 1, 2, 3])
    red_star = {1: "red", 2: "star"}
    circle = {2: "circle"}
    # The words alone name both stars; the relation keeps one.
    assert positive_rows(LABELS, match, red_star) == [0, 1]
    assert positive_rows(LABELS, match, red_star, ("left", circle), BOXES) == [0]
    assert positive_rows(LABELS, match, red_star, ("right", circle), BOXES) == [1]
    assert positive_rows(LABELS, match, red_star, ("above", circle), BOXES) == []
    # A region is never its own anchor: the star left of "a red star" is the left one only.
    assert positive_rows(LABELS, match, red_star, ("left", red_star), BOXES) == [0]
    with pytest.raises(ValueError, match="record boxes"):
        positive_rows(LABELS, match, red_star, ("left", circle))


def test_relational_queries_fall_back_to_plain_ones_and_need_boxes():
    align = RegionTextAlignment(drop_prob=0.0, relational_prob=1.0)
    # Two identical stars and nothing else: no anchor can be named alone.
    twins = [("small", "red", "star"), ("small", "red", "star")]
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.6, 0.0, 0.8, 0.2]])
    queries = align.queries(twins, torch.tensor([0, 1]), boxes=boxes)
    assert queries == [("the small red star", [0, 1])] * 2
    with pytest.raises(ValueError, match="record boxes"):
        align.queries(LABELS, torch.tensor([0]))
    with pytest.raises(ValueError, match="relational_prob"):
        RegionTextAlignment(relational_prob=1.5)
    # Relational queries compete over their own image even with batch negatives.
    wide = RegionTextAlignment(drop_prob=0.0, relational_prob=1.0, negatives="batch")
    matched = [(twins, torch.tensor([0, 1]), boxes), (LABELS, torch.tensor([0, 1, 2, 3]), BOXES)]
    generator = torch.Generator().manual_seed(0)
    texts, image_index, positives, relational = batch_queries(wide, matched, generator)
    assert relational[:2] == [False, False] and any(relational[2:])
    for text, rows, related in zip(texts, positives, relational, strict=True):
        if related:  # own image: rows 2..5
            assert " of the " in text or " above " in text or " below " in text
            assert rows and all(2 <= r <= 5 for r in rows)
        elif text == "the small red star":  # plain: the small red stars of the batch
            assert rows == [0, 1, 2]


def _recording(draw, into):
    def wrapped(*args, **kwargs):
        out = draw(*args, **kwargs)
        into.extend(out)
        return out

    return wrapped


@pytest.mark.parametrize("gated_phrase", [False, True], ids=["mean-phrase", "gated-phrase"])
def test_model_loss_trains_the_relation_head_on_relational_queries(
    build_model, make_batch, single_thread, monkeypatch, gated_phrase
):
    torch.manual_seed(0)
    model = build_model(
        region_pointer=dict(phrase_query=True, relation=dict(gated_phrase=gated_phrase)),
        region_text_loss=dict(relational_prob=1.0, negatives="batch"),
    )
    model.proposer = GroundTruthProposer()  # every object kept, so each has anchors to relate to
    crowded = [i for i in range(60) if len(make_batch([i])["data_samples"][0].gt_boxes) >= 3]
    batch = model.data_preprocessor(make_batch(crowded[:4]), True)
    queries = []
    monkeypatch.setattr(RegionTextAlignment, "draw", _recording(RegionTextAlignment.draw, queries))
    losses = model(**batch, mode="loss")
    assert any(query.relation is not None for query in queries)
    assert torch.isfinite(losses["loss_region_text"])
    assert 0.0 <= losses["region_text_rel_acc"].item() <= 1.0
    losses["loss_region_text"].backward()
    relation = model.region_pointer.relation
    params = [relation.gate.bias, relation.geometry[0].weight, relation.qkv.weight]
    if gated_phrase:  # the gated pool is every query's phrase (plain ones too)
        params.append(relation.keep.weight)
    for param in params:
        assert param.grad is not None and param.grad.abs().sum() > 0
    # Without a relation head the relational queries cannot be scored.
    plain = build_model(region_text_loss=dict(relational_prob=1.0))
    plain.proposer = GroundTruthProposer()
    with pytest.raises(ValueError, match="relation head"):
        plain(**plain.data_preprocessor(make_batch(crowded[:4]), True), mode="loss")
