"""DETRProposer: level choice, shapes, padding invariance, losses, gradients and input checks."""

import math

import pytest
import torch

from region_proposer.proposers.detr import DETRProposer
from region_proposer.registry import MODELS
from region_proposer.structures import FeaturePyramid
from region_proposer.testing import box_instances, random_vit_pyramid

CHANNELS = 16
SCALES = (2.0, 1.0, 0.5)  # a ViT pyramid (patch 14): deconv x2, identity, max-pool x1/2


def _model(**overrides):
    cfg = dict(
        in_channels=CHANNELS,
        embed_dim=32,
        num_heads=4,
        num_decoder_layers=2,
        ffn_dim=64,
        num_queries=8,
        max_tokens=300,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return DETRProposer(**cfg)


def _vit_pyramid(valid_sizes, seed=0):
    return random_vit_pyramid(valid_sizes, channels=CHANNELS, scales=SCALES, seed=seed)


_instances = box_instances


def test_level_choice_is_the_finest_within_budget():
    feats = _vit_pyramid([(200, 250)])  # 15x18 patches: 30x36, 15x18, 7x9 cells
    assert _model(max_tokens=300).select_level(feats) == 1
    assert _model(max_tokens=2000).select_level(feats) == 0
    assert _model(max_tokens=10).select_level(feats) == 2  # none fits: the coarsest
    assert _model(level=-1).select_level(feats) == 2
    with pytest.raises(ValueError, match="level=5"):
        _model(level=5).select_level(feats)


@pytest.mark.parametrize("sizes", [[(200, 250), (200, 249)], [(112, 112), (112, 112)]])
def test_shapes_square_and_non_square(sizes):
    model = _model().eval()
    with torch.no_grad():
        props = model(_vit_pyramid(sizes))
    assert props.boxes.shape == (2, 8, 4) and props.scores.shape == (2, 8)
    assert props.embeddings.shape == (2, 8, 32) and bool(props.valid.all())
    assert props.boxes.min() >= 0 and props.boxes.max() <= 1
    assert props.scores.min() >= 0 and props.scores.max() <= 1


def test_padded_image_gives_the_same_proposals_as_alone():
    padded = _vit_pyramid([(200, 249), (280, 280)])
    alone_maps = []
    for fmap in padded.maps:
        rows = math.ceil(200 * fmap.shape[-2] / padded.image_size[0])
        cols = math.ceil(249 * fmap.shape[-1] / padded.image_size[1])
        alone_maps.append(fmap[:1, :, :rows, :cols].clone())
        fmap[0, :, rows:] = 1e3  # garbage in image 0's padding must not matter
        fmap[0, :, :, cols:] = -1e3
    alone = FeaturePyramid.from_maps(alone_maps, (200, 249))
    model = _model(level=1).eval()
    with torch.no_grad():
        in_batch, single = model(padded), model(alone)
    torch.testing.assert_close(in_batch.boxes[:1], single.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch.scores[:1], single.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch.embeddings[:1], single.embeddings, atol=1e-4, rtol=0)


def test_backward_reaches_every_parameter_and_empty_gt():
    model = _model().train()
    feats = _vit_pyramid([(200, 250), (200, 249)])
    props, losses = model.loss(feats, _instances([[[0.1, 0.2, 0.5, 0.6]], []]))
    assert set(losses) == {
        "loss_focal",
        "loss_l1",
        "loss_giou",
        "d0.loss_focal",
        "d0.loss_l1",
        "d0.loss_giou",
    }
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and props.boxes.shape == (2, 8, 4)
    _, losses = model.loss(feats, _instances([[], []]))
    assert losses["loss_l1"].item() == 0 and torch.isfinite(losses["loss_focal"])


def test_input_checks():
    feats = _vit_pyramid([(112, 112)])
    feats.maps[2][0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"feats.maps\[2\] \(level 2"):
        _model()(feats)
    feats = _vit_pyramid([(112, 112)])
    with pytest.raises(ValueError, match="built for 2 feature levels"):
        _model(in_channels=(16, 16), level=0)(feats)
    with pytest.raises(ValueError, match="different channels"):
        _model(in_channels=(16, 8, 8))
    with pytest.raises(ValueError, match="expects 8 channels"):
        _model(in_channels=8)(feats)


def test_registered_and_built_from_config():
    model = MODELS.build(
        dict(
            type="DETRProposer",
            in_channels=16,
            embed_dim=32,
            num_heads=4,
            num_decoder_layers=1,
            ffn_dim=32,
            num_queries=4,
        )
    )
    assert isinstance(model, DETRProposer)
