"""ObjectnessHeads: per-source heads, fusion rules against hand-computed scores, config errors."""

import math

import pytest
import torch

from region_proposer.heads import ObjectnessHeads
from region_proposer.registry import MODELS

GROMA = dict(rule="geometric", weights=dict(coco=0.4, sa1b=0.6))


def test_one_head_per_source_with_focal_prior():
    heads = ObjectnessHeads(in_dim=8, sources=("coco", "sa1b"), fusion=GROMA, prior_prob=0.01)
    logits = heads(torch.randn(2, 5, 8))
    assert set(logits) == {"coco", "sa1b"} and logits["coco"].shape == (2, 5, 1)
    assert not torch.equal(logits["coco"], logits["sa1b"])  # independent weights
    for head in heads.heads.values():
        assert float(head.bias.detach().sigmoid()) == pytest.approx(0.01)


def test_default_single_head_is_sigmoid():
    heads = MODELS.build(dict(type="ObjectnessHeads", in_dim=4))
    logits = heads(torch.randn(3, 7, 4))
    scores = heads.fuse(logits)
    assert scores.shape == (3, 7)
    torch.testing.assert_close(scores, logits["default"][..., 0].sigmoid())


def test_geometric_fusion_equals_groma_by_hand():
    heads = ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"), fusion=GROMA)
    logits = {"coco": torch.tensor([[[0.3], [-2.0]]]), "sa1b": torch.tensor([[[1.5], [0.1]]])}
    coco = [1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(2.0))]
    sa1b = [1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(-0.1))]
    expected = torch.tensor([[c**0.4 * s**0.6 for c, s in zip(coco, sa1b, strict=True)]])
    torch.testing.assert_close(heads.fuse(logits), expected)


def test_geometric_fusion_is_stable_for_very_negative_logits():
    heads = ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"), fusion=GROMA)
    scores = heads.fuse({"coco": torch.full((1, 2, 1), -200.0), "sa1b": torch.zeros(1, 2, 1)})
    assert bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_mean_and_max(rule):
    heads = ObjectnessHeads(in_dim=4, sources=("a", "b", "c"), fusion=dict(rule=rule))
    logits = {name: torch.randn(2, 3, 1) for name in ("a", "b", "c")}
    probs = torch.stack([logits[name][..., 0].sigmoid() for name in ("a", "b", "c")])
    expected = probs.mean(0) if rule == "mean" else probs.max(0).values
    torch.testing.assert_close(heads.fuse(logits), expected)


def test_head_for_and_select():
    heads = ObjectnessHeads(in_dim=4, sources=("default", "sa1b"), fusion=dict(rule="max"))
    assert heads.head_for("sa1b") == "sa1b"
    assert heads.head_for("refcoco") == "default" and heads.head_for(None) == "default"
    logits = heads(torch.randn(2, 3, 4))
    picked = heads.select(logits, ["sa1b", "coco"])
    torch.testing.assert_close(picked[0], logits["sa1b"][0])
    torch.testing.assert_close(picked[1], logits["default"][1])
    strict = ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"), fusion=GROMA)
    with pytest.raises(ValueError, match=r"refcoco.*known sources: \['coco', 'sa1b'\]"):
        strict.head_for("refcoco")


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown sources \['lvis'\]"):
        ObjectnessHeads(
            in_dim=4,
            sources=("coco", "sa1b"),
            fusion=dict(rule="geometric", weights=dict(lvis=1.0)),
        )
    with pytest.raises(ValueError, match="need a fusion rule"):
        ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"))
    with pytest.raises(ValueError, match="fusion rule must be one of"):
        ObjectnessHeads(in_dim=4, fusion=dict(rule="product"))
    with pytest.raises(ValueError, match=">= 0"):
        ObjectnessHeads(
            in_dim=4, sources=("a", "b"), fusion=dict(rule="geometric", weights=dict(a=-1.0))
        )
    with pytest.raises(ValueError, match="unique"):
        ObjectnessHeads(in_dim=4, sources=("a", "a"), fusion=dict(rule="mean"))
    heads = ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"), fusion=GROMA)
    with pytest.raises(KeyError, match="sa1b"):
        heads.fuse({"coco": torch.zeros(1, 2, 1)})


def test_every_head_gets_a_gradient():
    heads = ObjectnessHeads(in_dim=4, sources=("coco", "sa1b"), fusion=GROMA)
    heads.fuse(heads(torch.randn(2, 3, 4))).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in heads.parameters())
