"""Tests for the grounded-answer parser ``groma_px.llm.parser``."""

from __future__ import annotations

import json
import random

import pytest

from groma_px.llm.parser import first_cited_box, parse_grounded_text
from groma_px.llm.tokenizer import build_tokenizer
from groma_px.llm.vocab import GroundingVocab
from groma_px.structures import GroundedRegion, GroundedResponse

VOCAB = GroundingVocab(8)
#: Six kept regions; region i has box (i, i, i + 1, i + 1) so a box names its kept index.
REGIONS = tuple(GroundedRegion((i, i, i + 1, i + 1), 0.5, "proposer") for i in range(6))


def parse(raw: str) -> GroundedResponse:
    return parse_grounded_text(raw, REGIONS, vocab=VOCAB)


def kept_indices(response: GroundedResponse) -> list[int]:
    """Kept-region index of each response region (recovered from the boxes)."""
    return [int(region.box[0]) for region in response.regions]


def cited(response: GroundedResponse, span_index: int) -> list[int]:
    """Kept-region indices cited by one span."""
    return [int(response.regions[i].box[0]) for i in response.spans[span_index].region_ids]


def test_two_phrases() -> None:
    raw = "The image shows <p>a red star</p><roi><r3></roi> and <p>two cats</p><roi><r0><r5></roi>."
    response = parse(raw)
    assert response.text == "The image shows a red star and two cats."
    assert [response.phrase(i) for i in range(2)] == ["a red star", "two cats"]
    assert [(s.start, s.end) for s in response.spans] == [(16, 26), (31, 39)]
    assert kept_indices(response) == [3, 0, 5]
    assert [s.region_ids for s in response.spans] == [(0,), (1, 2)]
    assert response.raw_text == raw
    assert response.warnings == ()
    json.dumps(response.to_dict())


def test_regions_deduplicated_in_order_of_first_citation() -> None:
    response = parse("<p>a</p><roi><r4><r1><r4></roi>, <p>b</p><roi><r1><r2></roi>")
    assert kept_indices(response) == [4, 1, 2]
    assert [s.region_ids for s in response.spans] == [(0, 1), (1, 2)]
    assert response.warnings == ()


def test_nested_phrases() -> None:
    raw = "<p>the man with <p>a hat</p><roi><r1></roi></p><roi><r0></roi> waves"
    response = parse(raw)
    assert response.text == "the man with a hat waves"
    assert [response.phrase(i) for i in range(2)] == ["a hat", "the man with a hat"]
    assert cited(response, 0) == [1] and cited(response, 1) == [0]
    assert response.warnings == ()


def test_spaces_decoded_around_markup_are_trimmed_from_spans() -> None:
    response = parse("see <p> a red star </p> <roi> <r3> </roi> now")
    assert response.phrase(0) == "a red star"
    assert cited(response, 0) == [3]
    assert "<" not in response.text
    assert response.warnings == ()


def _case(raw: str, text: str, phrases: list[str], citations: list[list[int]], warns: list[str]):
    return pytest.param(raw, text, phrases, citations, warns, id=raw)


@pytest.mark.parametrize(
    ("raw", "text", "phrases", "citations", "warns"),
    [
        _case("a <p>red star", "a red star", [], [], ["<p> not closed"]),
        _case("<p>cats</p><roi><r0><r1>", "cats", ["cats"], [[0, 1]], ["not closed"]),
        _case("<p>cats</p> sit", "cats sit", ["cats"], [[]], ["has no <roi>"]),
        _case("<p>cats</p>", "cats", ["cats"], [[]], ["has no <roi>"]),
        _case("see <roi><r2></roi>", "see ", [""], [[2]], ["without a phrase"]),
        _case(
            "<p>cats</p><roi><r0><r7></roi>", "cats<r7>", ["cats"], [[0]], ["<r7>: only 6 regions"]
        ),
        _case(
            "<p>cats</p><roi><r150></roi>",
            "cats<r150>",
            ["cats"],
            [[]],
            ["not a region token", "cites no valid region"],
        ),
        _case("<p>x</p><roi><r03></roi>", "x<r03>", ["x"], [[]], ["<r03>: not a region"]),
        _case(
            "<image>a <region>cat[grounding]<refer_box><ground_box><refer_feat>",
            "a cat",
            [],
            [],
            ["<image>", "<region>", "[grounding]", "<refer_box>", "<refer_feat>"],
        ),
        _case("a</p> b</roi>", "a b", [], [], ["</p> without <p>", "</roi> without <roi>"]),
        _case("<p>a</p><roi><roi><r1></roi>", "a", ["a"], [[1]], ["<roi> inside <roi>"]),
        _case("<p>a</p><roi><r1> and <r2></roi>", "a and ", ["a"], [[1, 2]], ["inside <roi>"]),
        _case(
            "<p>a</p><roi><r1><p>b</p><roi><r2></roi>",
            "ab",
            ["a", "b"],
            [[1], [2]],
            ["not closed before"],
        ),
        _case("<p>a</p><r4> b", "a b", ["a"], [[4]], ["<r4> outside <roi>"]),
        _case("x <r4> y", "x  y", [""], [[4]], ["outside <roi>"]),
        _case("<p>a</p> b <roi><r1></roi>", "a b ", ["a", ""], [[], [1]], ["has no <roi>"]),
        _case("<roi></roi>", "", [""], [[]], ["without a phrase", "no valid region"]),
    ],
)
def test_malformed_output_is_reported_not_raised(
    raw: str, text: str, phrases: list[str], citations: list[list[int]], warns: list[str]
) -> None:
    response = parse(raw)
    assert response.text == text
    assert [response.phrase(i) for i in range(len(response.spans))] == phrases
    assert [cited(response, i) for i in range(len(response.spans))] == citations
    joined = "\n".join(response.warnings)
    for expected in warns:
        assert expected in joined
    assert response.raw_text == raw


@pytest.mark.parametrize("raw", ["", "   ", "\n\t"])
def test_empty_and_whitespace(raw: str) -> None:
    response = parse(raw)
    assert response.text == raw
    assert response.spans == () and response.regions == () and response.warnings == ()
    assert first_cited_box(response) is None


def test_no_kept_regions() -> None:
    response = parse_grounded_text("<p>a</p><roi><r0></roi>", (), vocab=VOCAB)
    assert response.text == "a<r0>" and response.regions == ()
    assert response.spans[0].region_ids == ()
    assert any("only 0 regions" in w for w in response.warnings)


def test_first_cited_box() -> None:
    assert first_cited_box(parse("<p>x</p> <p>it</p><roi><r2><r1></roi>")) == (2, 2, 3, 3)
    assert first_cited_box(parse("<p>x</p>")) is None
    assert first_cited_box(parse("<roi><r5></roi>")) == (5, 5, 6, 6)


_SOUP = (
    "<p>",
    "</p>",
    "<roi>",
    "</roi>",
    "<r0>",
    "<r1>",
    "<r3>",
    "<r5>",
    "<r6>",
    "<r7>",
    "<r9>",
    "<r123>",
    "<r01>",
    "<r",
    "r>",
    "<image>",
    "<region>",
    "[grounding]",
    "<refer_box>",
    "<ground_box>",
    "<refer_feat>",
    " ",
    "  ",
    "\n",
    "cat",
    "a red",
    "é",
    "<",
    ">",
    "p>",
    "</",
)


def test_fuzz_token_soups_never_raise() -> None:
    rng = random.Random(0)
    for _ in range(400):
        raw = "".join(rng.choice(_SOUP) for _ in range(rng.randrange(0, 25)))
        response = parse(raw)  # GroundedResponse itself checks offsets and region ids
        assert response.raw_text == raw
        assert len(response.text) <= len(raw)
        indices = kept_indices(response)
        assert len(indices) == len(set(indices)) and all(0 <= i < len(REGIONS) for i in indices)
        for i, span in enumerate(response.spans):
            assert response.phrase(i) == response.phrase(i).strip()
            assert len(set(span.region_ids)) == len(span.region_ids)
        assert sorted({r for s in response.spans for r in s.region_ids}) == list(
            range(len(response.regions))
        )


def test_decoded_tokenizer_output() -> None:
    vocab = GroundingVocab(4)
    tokenizer = build_tokenizer(
        ["the red circle", "a blue square"] * 4, vocab=vocab, vocab_size=300
    )
    answer = "There is <p>the red circle</p><roi><r2></roi>."
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    response = parse_grounded_text(raw, REGIONS[:3], vocab=vocab)
    assert response.text == "There is the red circle."
    assert response.phrase(0) == "the red circle"
    assert first_cited_box(response) == REGIONS[2].box
