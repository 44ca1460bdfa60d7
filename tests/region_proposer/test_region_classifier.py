"""RegionClassifier (the stage-1 auxiliary shape loss): geometry, learning, labels through the
data pipeline, and clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import BaseDataElement, InstanceData
from PIL import Image

from region_proposer.pretrain import CocoBoxDataset, RandomCrop
from region_proposer.pretrain.region_classifier import RegionClassifier
from region_proposer.registry import MODELS
from region_proposer.structures import FeaturePyramid

TINY = Path(__file__).resolve().parents[2] / "configs" / "proposer" / "ddetr_vit-tiny_synthetic.py"


def _pyramid(maps, valid_sizes=None):
    size = (maps[0].shape[-2] * 4, maps[0].shape[-1] * 4)
    strides = tuple(size[0] / m.shape[-2] for m in maps)
    return FeaturePyramid(
        maps=tuple(maps), strides=strides, image_size=size, valid_sizes=valid_sizes
    )


def test_pools_each_box_at_its_own_place_whatever_the_padding():
    torch.manual_seed(0)
    head = RegionClassifier(in_channels=[4, 4], num_classes=3, roi_size=2, hidden_dim=8)
    alone = [torch.randn(1, 4, 8, 10), torch.randn(1, 4, 4, 5)]  # a 32x40 image, strides 4, 8
    padded = [torch.zeros(2, 4, 12, 12), torch.zeros(2, 4, 6, 6)]  # a 48x48 batch
    for full, small in zip(padded, alone, strict=True):
        full[1, :, : small.shape[-2], : small.shape[-1]] = small[0]
        full[0] = torch.randn_like(full[0])
    box = torch.tensor([[0.1, 0.2, 0.6, 0.9]])  # normalised to the unpadded 32x40 image
    logits_alone = head(_pyramid(alone), [box])
    valid = torch.tensor([[48, 48], [32, 40]])
    logits_padded = head(_pyramid(padded, valid), [torch.zeros(0, 4), box])
    torch.testing.assert_close(logits_padded, logits_alone, rtol=1e-5, atol=1e-5)


def test_learns_categories_that_live_in_the_features():
    torch.manual_seed(0)
    head = RegionClassifier(in_channels=[3], num_classes=3, roi_size=2, hidden_dim=16)
    optim = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        fmap = torch.randn(4, 3, 8, 8) * 0.1
        labels = [torch.randint(3, (2,)) for _ in range(4)]
        boxes = []
        for b, label in enumerate(labels):
            # two boxes per image, left and right half; the class is the channel lit inside
            fmap[b, label[0], :, :4] += 1.0
            fmap[b, label[1], :, 4:] += 1.0
            boxes.append(torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]))
        losses = head.loss(_pyramid([fmap]), boxes, labels)
        optim.zero_grad()
        losses["loss_region_cls"].backward()
        optim.step()
    assert losses["region_cls_acc"].item() == 1.0
    assert losses["loss_region_cls"].item() < 0.1


def test_loss_errors_and_empty_batch():
    head = RegionClassifier(in_channels=[3], num_classes=3)
    pyramid = _pyramid([torch.randn(1, 3, 8, 8)])
    box = [torch.tensor([[0.0, 0.0, 0.5, 0.5]])]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got \[5\]"):
        head.loss(pyramid, box, [torch.tensor([5])])
    with pytest.raises(ValueError, match="image 0: 1 boxes but 2 labels"):
        head.loss(pyramid, box, [torch.tensor([0, 1])])
    empty = head.loss(pyramid, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    empty["loss_region_cls"].backward()
    assert empty["loss_region_cls"].item() == 0.0
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        RegionClassifier(in_channels=[3], num_classes=1)


def _pattern_batch(generator, n_images=4):
    """Images whose class lives only in the pixels inside each box: 0 a filled square, 1 a
    hollow one, 2 a horizontal bar; two boxes per 32x32 image, left and right."""
    images = torch.zeros(n_images, 3, 32, 32)
    labels = [torch.randint(3, (2,), generator=generator) for _ in range(n_images)]
    boxes = torch.tensor([[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]])
    for b, label in enumerate(labels):
        for side, cls in enumerate(label.tolist()):
            x0 = 16 * side
            patch = images[b, :, 8:24, x0 : x0 + 16]
            if cls == 0:
                patch += 1.0
            elif cls == 1:
                patch += 1.0
                patch[:, 3:-3, 3:-3] = 0.0
            else:
                patch[:, 6:10, :] += 1.0
    return images, [boxes.clone() for _ in range(n_images)], labels


def test_pixel_expert_reads_what_the_pyramid_lacks():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    head = RegionClassifier(
        in_channels=[3],
        num_classes=3,
        roi_size=2,
        hidden_dim=8,
        pixel_roi_size=8,
        pixel_width=8,
        pixel_views=3,
        pixel_jitter=0.1,
    )
    optim = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(80):
        images, boxes, labels = _pattern_batch(generator)
        pyramid = _pyramid([torch.randn(4, 3, 8, 8)])  # stride 4, no class information
        losses = head.loss(pyramid, boxes, labels, image=images)
        optim.zero_grad()
        (losses["loss_region_cls"] + losses["loss_pixel_cls"]).backward()
        optim.step()
    assert {"loss_region_cls", "region_cls_acc", "loss_pixel_cls", "pixel_cls_acc"} <= set(losses)
    images, boxes, labels = _pattern_batch(generator)
    pyramid = _pyramid([torch.randn(4, 3, 8, 8)])
    with torch.no_grad():
        pixel = head.pixel_logits(pyramid, boxes, images)
        combined = head(pyramid, boxes, image=images)
        expected = head.pyramid_logits(pyramid, boxes).log_softmax(-1) + pixel.log_softmax(-1)
    target = torch.cat(labels)
    assert (pixel.argmax(-1) == target).float().mean().item() == 1.0
    assert (combined.argmax(-1) == target).float().mean().item() >= 0.875
    torch.testing.assert_close(combined, expected)


def test_pixel_views_are_jittered_copies_inside_the_image():
    torch.manual_seed(0)
    head = RegionClassifier(
        in_channels=[3], num_classes=3, pixel_roi_size=4, pixel_views=5, pixel_jitter=0.2
    )
    boxes = [torch.tensor([[0.0, 0.1, 0.4, 0.5], [0.5, 0.5, 1.0, 1.0]]), torch.zeros(0, 4)]
    views = head._jittered(boxes)
    assert views[0].shape == (10, 4) and views[1].shape == (0, 4)
    assert bool((views[0] >= 0).all() and (views[0] <= 1).all())
    moved = (views[0] - boxes[0].repeat(5, 1)).abs()
    extent = (boxes[0][:, 2:] - boxes[0][:, :2]).repeat(5, 2)
    assert bool((moved <= 0.2 * extent + 1e-6).all()) and moved.max() > 0
    # labels follow their views: one image, labels [1, 2] -> five views of each
    pyramid = _pyramid([torch.randn(2, 3, 8, 8)])
    images = torch.randn(2, 3, 32, 32)
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)]
    losses = head.loss(pyramid, boxes, labels, image=images)
    assert losses["loss_pixel_cls"].requires_grad


def test_pixel_expert_is_padding_invariant_and_checks_its_input():
    torch.manual_seed(0)
    head = RegionClassifier(in_channels=[4], num_classes=3, roi_size=2, pixel_roi_size=6)
    alone_map, alone_img = torch.randn(1, 4, 8, 10), torch.randn(1, 3, 32, 40)
    padded_map, padded_img = torch.randn(2, 4, 12, 12), torch.randn(2, 3, 48, 48)
    padded_map[1, :, :8, :10] = alone_map[0]
    padded_img[1, :, :32, :40] = alone_img[0]
    box = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    alone = head(_pyramid([alone_map]), [box], image=alone_img)
    valid = torch.tensor([[48, 48], [32, 40]])
    padded = head(_pyramid([padded_map], valid), [torch.zeros(0, 4), box], image=padded_img)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the input image"):
        head(_pyramid([alone_map]), [box])
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\) with B=1"):
        head(_pyramid([alone_map]), [box], image=torch.randn(2, 3, 32, 40))
    with pytest.raises(ValueError, match="no pixel expert"):
        RegionClassifier(in_channels=[4], num_classes=3).pixel_logits(
            _pyramid([alone_map]), [box], alone_img
        )
    for bad in (dict(pixel_roi_size=-1), dict(pixel_views=0), dict(pixel_jitter=0.5)):
        with pytest.raises(ValueError, match="pixel_roi_size >= 0, pixel_views >= 1"):
            RegionClassifier(in_channels=[4], num_classes=3, **bad)
    with pytest.raises(ValueError, match="pixel_weight must be > 0"):
        RegionClassifier(in_channels=[4], num_classes=3, pixel_weight=0.0)


def _write_coco(root, categories):
    Image.new("RGB", (40, 30)).save(root / "a.png")
    anns = [
        dict(id=1, image_id=1, category_id=9, bbox=[1, 1, 10, 10], area=100, iscrowd=0),
        dict(id=2, image_id=1, category_id=3, bbox=[20, 5, 10, 10], area=100, iscrowd=1),
        dict(id=3, image_id=1, category_id=3, bbox=[25, 15, 10, 10], area=100, iscrowd=0),
    ]
    coco = dict(
        images=[dict(id=1, file_name="a.png", height=30, width=40)],
        annotations=anns,
        categories=categories,
    )
    (root / "ann.json").write_text(json.dumps(coco))


def test_dataset_labels_follow_sorted_category_ids(tmp_path):
    _write_coco(tmp_path, [dict(id=9, name="star"), dict(id=3, name="circle")])
    ds = CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), with_labels=True)
    info = ds.get_data_info(0)
    assert ds.metainfo["classes"] == ("circle", "star")
    np.testing.assert_array_equal(info["gt_labels"], [1, 0])  # the crowd box is left out
    np.testing.assert_array_equal(info["gt_bboxes"], [[1, 1, 11, 11], [25, 15, 35, 25]])
    assert "gt_labels" not in CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path))[0]


def test_dataset_label_errors(tmp_path):
    _write_coco(tmp_path, [dict(id=3, name="object")])
    with pytest.raises(ValueError, match="ann.json: with_labels=True needs at least 2 categories"):
        CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), with_labels=True)
    _write_coco(tmp_path, [dict(id=3, name="circle"), dict(id=4, name="star")])
    with pytest.raises(ValueError, match=r"image 1 has annotations of category ids \[9\]"):
        CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), with_labels=True)


def test_crop_drops_labels_with_their_boxes():
    np.random.seed(0)
    results = dict(
        img=np.zeros((100, 100, 3), np.uint8),
        gt_bboxes=np.array([[0, 0, 20, 20], [40, 40, 60, 60], [80, 80, 100, 100]], np.float32),
        gt_labels=np.array([4, 5, 6]),
        affine=(1.0, 0.0, 1.0, 0.0),
    )
    out = RandomCrop(crop_ratio_range=(0.7, 0.7), prob=1.0)(results)
    assert len(out["gt_labels"]) == len(out["gt_bboxes"]) < 3
    assert 5 in out["gt_labels"].tolist()  # the middle box is inside every 70 x 70 window
    middle = out["gt_bboxes"][out["gt_labels"].tolist().index(5)]
    np.testing.assert_allclose(middle[2:] - middle[:2], [20, 20])


def _pretrainer_batch(with_labels):
    sample = BaseDataElement(metainfo=dict(sample_id="toy/0", source="synthetic"))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [60.0, 60.0, 100.0, 90.0]])
    sample.gt_instances = InstanceData(bboxes=boxes)
    if with_labels:
        sample.gt_instances.labels = torch.tensor([2, 6])
    return {
        "inputs": [torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)],
        "data_samples": [sample],
    }


@pytest.mark.parametrize("pixel", [False, True], ids=["default", "pixel-expert"])
def test_stage1_config_trains_the_backbone_through_the_classifier(pixel):
    cfg = Config.fromfile(str(TINY))
    assert cfg.train_dataloader.dataset.with_labels
    if pixel:  # the opt-in ablation of docs/NOTES.md, "Pixel shape expert"
        cfg.model.region_classifier.update(pixel_roi_size=16, pixel_views=2, pixel_jitter=0.15)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("region_proposer"):
        model = MODELS.build(cfg.model)
    model.train()
    losses = model(**model.data_preprocessor(_pretrainer_batch(True), True), mode="loss")
    assert {"loss_region_cls", "region_cls_acc", "loss_focal"} <= set(losses)
    # The pixel expert is off by default and adds its own loss only when configured.
    assert ({"loss_pixel_cls", "pixel_cls_acc"} <= set(losses)) is pixel
    # The box refiner trains beside them from the pixels alone (no gradient into the backbone).
    assert {"loss_box_refine", "refine_iou", "refine_iou_in"} <= set(losses)
    assert losses["loss_box_refine"].grad_fn is not None
    losses["loss_region_cls"].backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="'toy/0' has no gt_instances.labels"):
        model(**model.data_preprocessor(_pretrainer_batch(False), True), mode="loss")
