"""DeformableDETRProposer: shapes, padding invariance, losses, gradients and input checks."""

import math

import pytest
import torch
from mmengine.structures import InstanceData

from region_proposer.proposers.deformable_detr import DeformableDETRProposer
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
        num_levels=3,
        num_points=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        ffn_dim=64,
        num_queries=8,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return DeformableDETRProposer(**cfg)


def _vit_pyramid(valid_sizes, seed=0):
    return random_vit_pyramid(valid_sizes, channels=CHANNELS, scales=SCALES, seed=seed)


_instances = box_instances


BOXES = [[[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]], []]


@pytest.mark.parametrize("two_stage", [False, True])
@pytest.mark.parametrize("sizes", [[(200, 250), (200, 249)], [(112, 112), (112, 112)]])
def test_shapes_square_and_non_square(two_stage, sizes):
    model = _model(two_stage=two_stage).eval()
    with torch.no_grad():
        props = model(_vit_pyramid(sizes))
    assert props.boxes.shape == (2, 8, 4) and props.scores.shape == (2, 8)
    assert props.valid.dtype == torch.bool and props.embeddings.shape == (2, 8, 32)
    assert props.boxes.min() >= 0 and props.boxes.max() <= 1
    assert props.scores.min() >= 0 and props.scores.max() <= 1
    assert torch.all(props.boxes[..., 2:] >= props.boxes[..., :2])


@pytest.mark.parametrize("two_stage", [False, True])
def test_padded_image_gives_the_same_proposals_as_alone(two_stage):
    padded = _vit_pyramid([(200, 249), (280, 280)])
    alone_maps = []
    for fmap in padded.maps:
        rows = math.ceil(200 * fmap.shape[-2] / padded.image_size[0])
        cols = math.ceil(249 * fmap.shape[-1] / padded.image_size[1])
        alone_maps.append(fmap[:1, :, :rows, :cols].clone())
        fmap[0, :, rows:] = 1e3  # garbage in image 0's padding must not matter
        fmap[0, :, :, cols:] = -1e3
    alone = FeaturePyramid.from_maps(alone_maps, (200, 249))
    model = _model(two_stage=two_stage).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the symmetric init
            p.add_(0.05 * torch.randn_like(p))
        in_batch, single = model(padded), model(alone)
    torch.testing.assert_close(in_batch.boxes[:1], single.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch.scores[:1], single.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch.embeddings[:1], single.embeddings, atol=1e-4, rtol=0)


@pytest.mark.parametrize("two_stage,refine", [(False, True), (True, True), (False, False)])
def test_backward_reaches_every_parameter(two_stage, refine):
    model = _model(two_stage=two_stage, with_box_refine=refine).train()
    feats = _vit_pyramid([(200, 250), (200, 249)])
    props, losses = model.loss(feats, _instances(BOXES))
    expected = {"loss_focal", "loss_l1", "loss_giou", "d0.loss_focal", "d0.loss_l1", "d0.loss_giou"}
    if two_stage:
        expected |= {"enc.loss_focal", "enc.loss_l1", "enc.loss_giou"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert props.boxes.shape == (2, 8, 4)


def test_images_without_objects():
    model = _model()
    feats = _vit_pyramid([(112, 112), (112, 100)])
    _, losses = model.loss(feats, _instances([[], []]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_l1"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_focal"].item() > 0  # pushes every score down
    _, losses = model.loss(feats, [InstanceData(bboxes=torch.zeros(0)), _instances([[]])[0]])
    assert losses["loss_l1"].item() == 0


def test_per_source_heads_and_unused_head_gradient():
    fusion = dict(rule="geometric", weights=dict(coco=0.4, sa1b=0.6))
    model = _model(objectness=dict(sources=("coco", "sa1b"), fusion=fusion))
    feats = _vit_pyramid([(112, 112), (112, 112)])
    _, losses = model.loss(feats, _instances(BOXES, sources=["coco", "coco"]))
    sum(losses.values()).backward()
    sa1b = model.objectness_heads[-1].heads["sa1b"].weight
    assert sa1b.grad is not None and float(sa1b.grad.abs().sum()) == 0
    with pytest.raises(ValueError, match="no objectness head for source 'lvis'"):
        model.loss(feats, _instances(BOXES, sources=["coco", "lvis"]))


def test_nan_in_features_names_the_level():
    feats = _vit_pyramid([(112, 112)])
    feats.maps[1][0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"feats.maps\[1\] \(level 1"):
        _model()(feats)


def test_wrong_number_of_levels_or_channels():
    feats = _vit_pyramid([(112, 112)])
    two_levels = FeaturePyramid.from_maps(feats.maps[:2], feats.image_size)
    with pytest.raises(ValueError, match="built for 3 feature levels but the FeaturePyramid has 2"):
        _model()(two_levels)
    with pytest.raises(ValueError, match="expects channels"):
        _model(in_channels=(16, 16, 8))(feats)
    with pytest.raises(ValueError, match="num_levels=2"):
        _model(in_channels=(16, 16, 16), num_levels=2)


def test_two_stage_needs_enough_cells_and_marks_invalid_queries():
    feats = _vit_pyramid([(28, 28)])  # 4x4 + 2x2 + 1x1 = 21 cells
    with pytest.raises(ValueError, match="at least num_queries=30 cells"):
        _model(two_stage=True, num_queries=30)(feats)
    model = _model(two_stage=True, num_queries=30).eval()
    with torch.no_grad():
        props = model(_vit_pyramid([(56, 56), (28, 28)]))  # image 1: 21 valid cells of 84
    assert bool(props.valid[0].all()) and int(props.valid[1].sum()) == 21


def test_registered_and_built_from_config():
    cfg = dict(
        type="DeformableDETRProposer",
        in_channels=[16, 16, 16],
        embed_dim=32,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=32,
        num_queries=4,
    )
    model = MODELS.build(cfg)
    assert isinstance(model, DeformableDETRProposer) and model.num_levels == 3


@pytest.mark.slow
def test_overfits_two_images():
    torch.manual_seed(0)
    model = _model(num_encoder_layers=1, num_points=2, dropout=0.0)
    feats = _vit_pyramid([(112, 112), (112, 98)], seed=3)
    boxes = [
        [[0.1, 0.1, 0.4, 0.5]],
        [[0.5, 0.2, 0.9, 0.7], [0.2, 0.6, 0.4, 0.9], [0.0, 0.0, 0.3, 0.3]],
    ]
    instances = _instances(boxes)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        _, losses = model.loss(feats, instances)
        optim.zero_grad()
        sum(losses.values()).backward()
        optim.step()
        first = losses["loss_l1"].item() if first is None else first
    assert losses["loss_l1"].item() < 0.25 * first
