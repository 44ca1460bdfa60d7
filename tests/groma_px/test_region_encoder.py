"""RoIRegionEncoder: RoIAlign against hand-cropped cells, real strides, shapes, legacy mode."""

import pytest
import torch
from torchvision.ops import box_convert

from groma_px.region_encoder import RoIRegionEncoder
from groma_px.region_encoder import roi_encoder as roi_module
from groma_px.region_encoder.roi_encoder import pool_regions
from groma_px.registry import MODELS
from region_proposer.layers import roi_pooling
from region_proposer.structures import FeaturePyramid


def _odd_pyramid(channels: int = 4) -> FeaturePyramid:
    """200x250 and 200x249 images padded to 200x250, at strides 8 and 200/13."""
    gen = torch.Generator().manual_seed(0)
    maps = [
        torch.randn(2, channels, 25, 32, generator=gen),
        torch.randn(2, channels, 13, 16, generator=gen),
    ]
    valid = torch.tensor([[200, 250], [200, 249]])
    return FeaturePyramid.from_maps(maps, image_size=(200, 250), valid_sizes=valid)


def _encoder(**kwargs) -> RoIRegionEncoder:
    torch.manual_seed(0)
    args = dict(in_channels=4, num_levels=2, out_dim=6, roi_size=2, hidden_dim=8)
    args.update(kwargs)
    return RoIRegionEncoder(**args)


def _boxes() -> list[torch.Tensor]:
    return [
        torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.7, 0.1, 0.9, 0.3]]),
        torch.tensor([[0.3, 0.3, 0.8, 0.9], [0.5, 0.0, 0.6, 0.2]]),
    ]


def test_roi_align_matches_hand_average_of_cells():
    # Box pixels x 8..24, y 4..20 on a stride-4 map = cells x 2..5, y 1..4; 2x2 output bins of
    # 2x2 cells; sampling_ratio 2 samples exactly at the cell centres (aligned=True).
    fmap = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    pyramid = FeaturePyramid.from_maps([fmap], image_size=(32, 32))
    box = torch.tensor([[8 / 32, 4 / 32, 24 / 32, 20 / 32]])
    (pooled,) = pool_regions(pyramid, [box], levels=[0], roi_size=2, sampling_ratio=2)
    crop = fmap[0, 0, 1:5, 2:6]  # (4, 4) rows y 1..4, cols x 2..5
    expected = crop.reshape(2, 2, 2, 2).mean(dim=(1, 3))  # [i, a, j, b] -> bin (i, j)
    torch.testing.assert_close(pooled[0, 0], expected)


def test_roi_align_uses_each_images_valid_size_in_a_padded_batch():
    # Padded 32x48 batch; image 1 is 16x32. With sampling_ratio 1 a bin of 2 cells samples the
    # boundary between them (their mean) and a bin of 1 cell its centre (the cell itself).
    fmap = torch.randn(2, 1, 8, 12, generator=torch.Generator().manual_seed(2))
    valid = torch.tensor([[32, 48], [16, 32]])
    pyramid = FeaturePyramid.from_maps([fmap], image_size=(32, 48), valid_sizes=valid)
    boxes = [torch.tensor([[0.0, 0.0, 1 / 3, 0.25]]), torch.tensor([[0.25, 0.25, 0.75, 0.75]])]
    (pooled,) = pool_regions(pyramid, boxes, levels=[0], roi_size=2, sampling_ratio=1)
    # image 0: pixels x 0..16, y 0..8 -> cells x 0..3, y 0..1
    torch.testing.assert_close(pooled[0, 0], fmap[0, 0, 0:2, 0:4].reshape(2, 2, 2).mean(-1))
    # image 1: pixels x 8..24, y 4..12 -> cells x 2..5, y 1..2
    torch.testing.assert_close(pooled[1, 0], fmap[1, 0, 1:3, 2:6].reshape(2, 2, 2).mean(-1))


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_shapes_on_odd_non_square_padded_batch(fusion):
    encoder = _encoder(fusion=fusion)
    tokens = encoder(_odd_pyramid(), _boxes())
    assert tokens.shape == (5, 6) and torch.isfinite(tokens).all()
    # Batch order: image 1's regions alone give the last two rows.
    single = FeaturePyramid.from_maps(
        [m[1:] for m in _odd_pyramid().maps],
        image_size=(200, 250),
        valid_sizes=torch.tensor([[200, 249]]),
    )
    torch.testing.assert_close(encoder(single, _boxes()[1:]), tokens[3:])


def test_spatial_scale_comes_from_the_pyramid_strides(monkeypatch):
    scales = []

    def spy(*args, **kwargs):
        scales.append(kwargs["spatial_scale"])
        return real(*args, **kwargs)

    real = roi_pooling.roi_align  # the pyramid levels are pooled by region_proposer's layer
    monkeypatch.setattr(roi_pooling, "roi_align", spy)
    box = [torch.tensor([[0.25, 0.25, 0.75, 0.75]])]
    fine = FeaturePyramid.from_maps([torch.randn(1, 1, 8, 8)], image_size=(32, 32))
    coarse = FeaturePyramid.from_maps([torch.randn(1, 1, 4, 4)], image_size=(32, 32))
    for pyramid in (fine, coarse):
        pool_regions(pyramid, box, levels=[0], roi_size=2, sampling_ratio=2)
    pool_regions(fine, box, levels=[0], roi_size=2, sampling_ratio=2, legacy_groma_roi=True)
    assert scales == [1 / 4, 1 / 8, roi_module.LEGACY_GROMA_SCALE_FACTOR / 4]
    scales.clear()
    _encoder()(_odd_pyramid(), _boxes())
    assert scales == pytest.approx([1 / 8, 13 / 200])


def test_empty_boxes_give_empty_tokens_in_the_graph():
    encoder = _encoder()
    tokens = encoder(_odd_pyramid(), [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert tokens.shape == (0, 6) and tokens.requires_grad
    tokens.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    one_empty = encoder(_odd_pyramid(), [torch.zeros(0, 4), _boxes()[1]])
    assert one_empty.shape == (2, 6)


def test_legacy_mode_reproduces_groma_boxes_and_scale():
    fmap = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    pyramid = FeaturePyramid.from_maps([fmap], image_size=(32, 32))
    box = torch.tensor([[0.0, 0.0, 0.4, 0.2]])  # cxcywh (0.2, 0.1, 0.4, 0.2) != xyxy
    kwargs = dict(levels=[0], roi_size=2, sampling_ratio=2)
    (legacy,) = pool_regions(pyramid, [box], legacy_groma_roi=True, **kwargs)
    (correct,) = pool_regions(pyramid, [box], **kwargs)
    assert not torch.allclose(legacy, correct)
    # Legacy = the correct pooling of 2 * cxcywh read as xyxy.
    as_groma = 2 * box_convert(box, in_fmt="xyxy", out_fmt="cxcywh")
    (expected,) = pool_regions(pyramid, [as_groma], **kwargs)
    torch.testing.assert_close(legacy, expected)
    with pytest.warns(UserWarning, match="legacy_groma_roi"):
        legacy_encoder = _encoder(legacy_groma_roi=True)
    encoder = _encoder()
    legacy_encoder.load_state_dict(encoder.state_dict())
    assert not torch.allclose(
        legacy_encoder(_odd_pyramid(), _boxes()), encoder(_odd_pyramid(), _boxes())
    )


@pytest.mark.parametrize(("fusion", "levels"), [("sum", None), ("concat", [1, 0])])
def test_backward_reaches_every_parameter(fusion, levels):
    encoder = _encoder(fusion=fusion, levels=levels)
    pyramid = _odd_pyramid()
    for fmap in pyramid.maps:
        fmap.requires_grad_(True)
    encoder(pyramid, _boxes()).square().sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in pyramid.maps)


def test_without_box_embed_and_bad_arguments():
    assert _encoder(box_embed=False).box_embed is None
    with pytest.raises(ValueError, match="fusion"):
        _encoder(fusion="mean")
    with pytest.raises(ValueError, match="levels"):
        _encoder(levels=[2])
    with pytest.raises(ValueError, match="pyramid levels"):
        _encoder(num_levels=3, levels=[0, 1])(_odd_pyramid(), _boxes())
    with pytest.raises(ValueError, match="in_channels"):
        _encoder(in_channels=5)(_odd_pyramid(), _boxes())
    with pytest.raises(ValueError, match="batch size"):
        _encoder()(_odd_pyramid(), _boxes()[:1])


def test_box_features_in_shorter_side_units():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 0.75]])
    plain = roi_module.box_features(boxes)
    torch.testing.assert_close(plain[:, 4:], torch.tensor([[0.5, 0.5], [0.5, 0.25]]))
    # (h, w): 100x200 (landscape) and 300x150 (portrait); extents / shorter side.
    sized = roi_module.box_features(boxes, torch.tensor([[100, 200], [300, 150]]))
    torch.testing.assert_close(sized[:, :6], plain)
    torch.testing.assert_close(sized[:, 6:], torch.tensor([[1.0, 0.5], [0.5, 0.5]]))


def test_shorter_side_box_embed_tells_image_aspects_apart():
    # The same normalised box on a square and on a wide image: "xyxywh" embeds both alike,
    # "shorter_side" does not (the box on the wide image is twice as wide in pixels).
    fmap = torch.zeros(2, 4, 8, 16)
    valid = torch.tensor([[64, 64], [64, 128]])
    pyramid = FeaturePyramid.from_maps(
        [fmap, fmap[..., ::2, ::2]], image_size=(64, 128), valid_sizes=valid
    )
    boxes = [torch.tensor([[0.25, 0.25, 0.5, 0.5]])] * 2
    plain = _encoder()(pyramid, boxes)
    torch.testing.assert_close(plain[0], plain[1])
    aware = _encoder(box_embed="shorter_side")
    assert aware.box_embed[0].in_features == 8
    tokens = aware(pyramid, boxes)
    assert not torch.allclose(tokens[0], tokens[1])
    # Without valid sizes every image is the padded size (64x128 here): both alike again.
    unpadded = FeaturePyramid.from_maps(pyramid.maps, image_size=(64, 128))
    same = aware(unpadded, boxes)
    torch.testing.assert_close(same[0], same[1])
    with pytest.raises(ValueError, match="box_embed"):
        _encoder(box_embed="polar")


def test_registered_in_groma_px_models():
    # module_dict, not build(): a build imports every registry location (seconds of imports).
    assert MODELS.module_dict["RoIRegionEncoder"] is RoIRegionEncoder


@pytest.mark.parametrize("pixel_head", ["mlp", "cnn"])
def test_pixel_branch_reads_the_image_inside_each_box_only(pixel_head):
    pyramid = _odd_pyramid()
    encoder = _encoder(pixel_roi_size=3, pixel_head=pixel_head).eval()
    boxes = _boxes()
    image = torch.randn(2, 3, 200, 250, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = encoder(pyramid, boxes, image=image)
        # Change the pixels of image 0 inside box 2 (x 175..225, y 20..60) only.
        changed = image.clone()
        changed[0, :, 22:58, 177:223] += 5.0
        moved = encoder(pyramid, boxes, image=changed)
        without = _encoder()(pyramid, boxes)
    diff = (moved - base).abs().amax(-1)
    assert diff[2] > 1e-3  # the box whose pixels changed
    assert diff[[0, 3, 4]].max() == 0  # boxes elsewhere (box 1 is the whole image 0)
    assert base.shape == without.shape
    with pytest.raises(ValueError, match="needs the input image"):
        encoder(pyramid, boxes)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(pyramid, boxes, image=image[:1])
    with pytest.raises(ValueError, match="pixel_roi_size"):
        _encoder(pixel_roi_size=-1)
    with pytest.raises(ValueError, match="pixel_head"):
        _encoder(pixel_roi_size=3, pixel_head="vit")


@pytest.mark.parametrize(
    "classifier_cfg", [dict(num_classes=7), dict(num_classes=7, pixel_roi_size=8)], ids=str
)
def test_stage1_region_classifier_feeds_the_region_tokens(
    build_model, tiny_cfg, make_batch, single_thread, classifier_cfg
):
    from region_proposer.pretrain import ProposerPretrainer

    plain = build_model()
    model = build_model(
        region_classifier=classifier_cfg, frozen=("backbone", "proposer", "region_classifier")
    )
    # a stage-1 checkpoint's classifier loads under the same names, and stays frozen
    stage1 = ProposerPretrainer(
        backbone=tiny_cfg.model.backbone.to_dict(),
        proposer=tiny_cfg.model.proposer.to_dict(),
        region_classifier=dict(classifier_cfg, pixel_views=4, pixel_jitter=0.1),
    ).state_dict()
    classifier = {k: v for k, v in stage1.items() if k.startswith("region_classifier.")}
    assert classifier
    assert any(".pixel_head." in k for k in classifier) == ("pixel_roi_size" in classifier_cfg)
    assert not model.load_state_dict(classifier, strict=False).unexpected_keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in classifier.items())
    assert not any(p.requires_grad for p in model.region_classifier.parameters())
    # the projection starts at zero: the same tokens as the model without the classifier
    plain.load_state_dict(model.state_dict(), strict=False)
    data = model.data_preprocessor(make_batch([0, 1]), False)
    with torch.no_grad():
        perception = plain.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        reference = plain._region_features(perception)[0]
        assert torch.equal(model._region_features(perception)[0], reference)
        model.class_embed.weight.normal_()
        assert not torch.allclose(model._region_features(perception)[0], reference)
    model(**model.data_preprocessor(make_batch([0, 1]), True), mode="loss")["loss"].backward()
    assert model.class_embed.weight.grad.abs().sum() > 0


def test_stage1_box_refiner_tightens_the_proposals_before_selection(
    build_model, tiny_cfg, make_batch, single_thread
):
    from region_proposer.pretrain import ProposerPretrainer

    refiner_cfg = dict(roi_size=16, num_steps=2)
    plain = build_model()
    model = build_model(box_refiner=refiner_cfg)
    # a stage-1 checkpoint's refiner loads under the same names, and is frozen without asking
    stage1 = ProposerPretrainer(
        backbone=tiny_cfg.model.backbone.to_dict(),
        proposer=tiny_cfg.model.proposer.to_dict(),
        box_refiner=refiner_cfg,
    )
    torch.nn.init.normal_(stage1.box_refiner.net[-1].weight, std=0.05)
    refiner = {k: v for k, v in stage1.state_dict().items() if k.startswith("box_refiner.")}
    assert refiner
    assert not model.load_state_dict(refiner, strict=False).unexpected_keys
    assert "box_refiner" in model.frozen
    assert not any(p.requires_grad for p in model.box_refiner.parameters())
    plain.load_state_dict(model.state_dict(), strict=False)
    data = model.data_preprocessor(make_batch([0, 1]), False)
    args = (data["inputs"], data["data_samples"], data["valid_sizes"])
    with torch.no_grad():
        _, base = plain._propose(*args)
        _, refined = model._propose(*args)
    expected = stage1.box_refiner.refine_proposals(data["inputs"], base, data["valid_sizes"])
    torch.testing.assert_close(refined.boxes, expected.boxes)
    assert not torch.allclose(refined.boxes, base.boxes)
    torch.testing.assert_close(refined.scores, base.scores)
    # only the proposals the selector can keep are refined: its threshold, when higher, wins
    strict = build_model(
        box_refiner=dict(refiner_cfg, score_thr=0.05), selector=dict(score_thr=0.3)
    )
    assert strict.box_refiner.score_thr == 0.3
    # ... the lower of its training and test thresholds (a looser test rule keeps more)
    looser_test = build_model(
        box_refiner=dict(refiner_cfg, score_thr=0.05),
        selector=dict(score_thr=0.3, test_cfg=dict(score_thr=0.2)),
    )
    assert looser_test.box_refiner.score_thr == 0.2
    assert build_model(box_refiner=dict(refiner_cfg, score_thr=0.05)).box_refiner.score_thr == 0.05
