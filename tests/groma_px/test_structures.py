"""RegionTokens and GroundedResponse contracts."""

import json

import pytest
import torch

from groma_px.structures import (
    GroundedRegion,
    GroundedResponse,
    GroundedSpan,
    RegionSource,
    RegionTokens,
)


def _tokens(b=2, k=4, d=8, **over):
    fields = dict(
        tokens=torch.randn(b, k, d),
        boxes=torch.rand(b, k, 4),
        valid=torch.ones(b, k, dtype=torch.bool),
        source=torch.full((b, k), int(RegionSource.PROPOSER)),
    )
    fields.update(over)
    return RegionTokens(**fields)


def test_region_tokens_ok():
    rt = _tokens()
    assert rt.num_regions == 4


@pytest.mark.parametrize(
    "over, error, pattern",
    [
        (dict(boxes=torch.rand(2, 3, 4)), ValueError, r"RegionTokens.boxes has leading dims"),
        (dict(valid=torch.ones(2, 4)), TypeError, r"RegionTokens.valid must have dtype"),
        (dict(tokens=torch.randn(2, 4)), ValueError, r"RegionTokens.tokens must have 3 dims"),
        (dict(source=torch.full((2, 4), 7)), ValueError, r"RegionTokens.source holds codes \[7\]"),
        (dict(source=torch.zeros(2, 4)), TypeError, r"RegionTokens.source must have dtype"),
    ],
)
def test_region_tokens_errors(over, error, pattern):
    with pytest.raises(error, match=pattern):
        _tokens(**over)


def test_grounded_response_roundtrip_json():
    text = "the dog and the cat"
    resp = GroundedResponse(
        text=text,
        spans=(GroundedSpan(0, 7, (0,)), GroundedSpan(12, 19, (1,))),
        regions=(
            GroundedRegion((1, 2, 30, 40), 0.9, "proposer"),
            GroundedRegion((5, 5, 6, 6), 1.0, "user"),
        ),
        raw_text="<p>the dog</p><roi><r0></roi> and <p>the cat</p><roi><r1></roi>",
    )
    assert resp.phrase(0) == "the dog" and resp.phrase(1) == "the cat"
    out = json.loads(json.dumps(resp.to_dict()))
    assert out["spans"][1] == {"start": 12, "end": 19, "phrase": "the cat", "regions": [1]}
    assert out["regions"][0]["box"] == [1.0, 2.0, 30.0, 40.0]


def test_grounded_response_errors():
    with pytest.raises(ValueError, match=r"spans\[0\] = \[0, 50\) lies outside"):
        GroundedResponse(text="short", spans=(GroundedSpan(0, 50, ()),))
    with pytest.raises(ValueError, match=r"spans\[0\] cites regions \[2\]"):
        GroundedResponse(
            text="short",
            spans=(GroundedSpan(0, 5, (2,)),),
            regions=(GroundedRegion((0, 0, 1, 1), 1.0, "user"),),
        )
    with pytest.raises(ValueError, match="GroundedRegion.score"):
        GroundedRegion((0, 0, 1, 1), 1.5, "user")
    with pytest.raises(ValueError, match="GroundedRegion.source"):
        GroundedRegion((0, 0, 1, 1), 0.5, "oracle")
    with pytest.raises(ValueError, match="GroundedRegion.box"):
        GroundedRegion((5, 0, 1, 1), 0.5, "user")
