"""Stage-1 transforms keep boxes on their pixels, and predictions map back to the original."""

import numpy as np
import pytest
import torch

from region_proposer.pretrain.transforms import (
    LoadImage,
    PackProposerInputs,
    RandomCrop,
    RandomFlip,
    Resize,
    to_original_boxes,
)

# Three coloured rectangles on black, 90 (H) x 130 (W); boxes are pixel-edge xyxy.
BOXES = np.array([[10, 5, 40, 30], [70, 40, 125, 85], [45, 60, 60, 88]], dtype=np.float32)


@pytest.fixture
def results(tmp_path):
    from PIL import Image

    img = np.zeros((90, 130, 3), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(BOXES.astype(int)):
        img[y0:y1, x0:x1, i] = 255
    Image.fromarray(img).save(tmp_path / "img.png")
    return LoadImage()({"img_path": str(tmp_path / "img.png"), "gt_bboxes": BOXES.copy()})


def _tight_box(img, channel):
    ys, xs = np.nonzero(img[..., channel] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_follow_pixels_through_resize_flip_crop(results, seed):
    np.random.seed(seed)
    out = Resize(max_size=(64, 200))(results)
    out = RandomFlip(prob=1.0)(out)
    out = RandomCrop(prob=1.0, crop_ratio_range=(0.7, 1.0), min_area_ratio=0.0)(out)
    img = out["img"]
    assert img.shape[:2] == out["img_shape"]
    for box in out["gt_bboxes"]:
        assert 0 <= box[0] <= box[2] <= img.shape[1] and 0 <= box[1] <= box[3] <= img.shape[0]
    # Every kept box that is not clipped by the crop matches its rectangle's pixels (±1.5 px
    # after bilinear resizing).
    for box in out["gt_bboxes"]:
        channel = [
            c
            for c in range(3)
            if img[..., c].max() > 127 and np.abs(_tight_box(img, c) - box).max() < 3
        ]
        assert channel, f"box {box} does not bound any rectangle"


@pytest.mark.parametrize("seed", range(6))
def test_to_original_inverts_any_composition(results, seed):
    np.random.seed(seed)
    out = Resize(max_size=(50, 300))(results)
    out = RandomCrop(prob=1.0, crop_ratio_range=(0.9, 1.0), min_area_ratio=0.0)(out)
    out = RandomFlip(prob=1.0)(out)
    out = Resize(max_size=100)(out)
    # Map a transformed point set back: transform the original boxes with the recorded affine.
    ax, bx, ay, by = out["affine"]
    forward = np.stack(
        [
            BOXES[:, 0] * ax + bx,
            BOXES[:, 1] * ay + by,
            BOXES[:, 2] * ax + bx,
            BOXES[:, 3] * ay + by,
        ],
        axis=1,
    )
    forward[:, [0, 2]] = np.sort(forward[:, [0, 2]], axis=1)
    back = to_original_boxes(torch.from_numpy(forward), out)
    torch.testing.assert_close(back, torch.from_numpy(BOXES), atol=1e-3, rtol=0)


def test_flip_mirrors_exactly(results):
    out = RandomFlip(prob=1.0)(results)
    np.testing.assert_array_equal(out["gt_bboxes"][0], [90, 5, 120, 30])
    np.testing.assert_array_equal(_tight_box(out["img"], 0), [90, 5, 120, 30])


def test_crop_drops_mostly_outside_boxes(results):
    np.random.seed(0)
    out = RandomCrop(prob=1.0, crop_ratio_range=(0.3, 0.3), min_area_ratio=0.9)(results)
    h, w = out["img_shape"]
    assert (h, w) == (27, 39)
    for box in out["gt_bboxes"]:
        assert box[2] <= w and box[3] <= h


def test_pack_and_errors(results, tmp_path):
    packed = PackProposerInputs()(dict(results, sample_id="toy/1", source="toy"))
    assert packed["inputs"].shape == (3, 90, 130) and packed["inputs"].dtype == torch.uint8
    sample = packed["data_samples"]
    assert sample.metainfo["sample_id"] == "toy/1"
    torch.testing.assert_close(sample.gt_instances.bboxes, torch.from_numpy(BOXES))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        LoadImage()({"img_path": str(tmp_path / "missing.png")})
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        LoadImage()({"img_path": str(tmp_path / "bad.png")})
    with pytest.raises(ValueError, match="crop_ratio_range"):
        RandomCrop(crop_ratio_range=(0.0, 1.0))
