"""Visual prompts: points snap to proposals, masks give tight boxes and mask-pooled tokens."""

import pytest
import torch

from groma_px.region_encoder import RoIRegionEncoder
from groma_px.region_encoder.prompts import mask_box, snap_points
from region_proposer.structures import FeaturePyramid


def test_point_snaps_to_the_best_proposal_containing_it_else_a_square():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]])
    scores = torch.tensor([0.9, 0.9, 0.2])
    points = torch.tensor([[0.2, 0.2], [0.7, 0.8], [0.95, 0.05]])
    out = snap_points(points, boxes, scores, fallback_size=0.1)
    assert torch.equal(out[0], boxes[1])  # equal scores: the smaller box
    assert torch.equal(out[1], boxes[2])  # the only one containing it, however low its score
    assert torch.allclose(out[2], torch.tensor([0.9, 0.0, 1.0, 0.1]))  # clipped square
    assert snap_points(points, boxes[:0], scores[:0]).shape == (3, 4)
    assert snap_points(points[:0], boxes, scores).shape == (0, 4)


def test_mask_box_is_the_tight_pixel_box():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask).tolist() == [3.0, 2.0, 9.0, 5.0]
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(torch.zeros(4, 4, dtype=torch.bool))


def _pyramid():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)]
    return FeaturePyramid.from_maps(maps, image_size=(64, 64))


def test_mask_pooling_reads_only_the_masked_pixels_of_the_box():
    torch.manual_seed(0)
    encoder = RoIRegionEncoder(
        in_channels=4, num_levels=2, out_dim=6, roi_size=2, hidden_dim=8, pixel_roi_size=4
    ).eval()
    pyramid = _pyramid()
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])]
    image = torch.randn(1, 3, 64, 64)
    left = torch.zeros(64, 64, dtype=torch.bool)
    left[:32, :16] = True  # the left half of box 0
    with torch.no_grad():
        plain = encoder(pyramid, boxes, image=image)
        masked = encoder(pyramid, boxes, image=image, masks=[{0: left}])
        # Pixels of box 0 outside the mask do not matter for the mask-pooled token.
        changed = image.clone()
        changed[:, :, :32, 20:32] += 3.0
        masked_changed = encoder(pyramid, boxes, image=changed, masks=[{0: left}])
        plain_changed = encoder(pyramid, boxes, image=changed)
    assert not torch.allclose(plain[0], masked[0])
    assert torch.equal(plain[1], masked[1])  # regions without a mask are untouched
    assert torch.allclose(masked[0], masked_changed[0], atol=1e-6)
    assert not torch.allclose(plain[0], plain_changed[0])
    with pytest.raises(ValueError, match="row 5"):
        encoder(pyramid, boxes, image=image, masks=[{5: left}])
    with pytest.raises(ValueError, match="larger than"):
        encoder(pyramid, boxes, image=image, masks=[{0: torch.ones(70, 64, dtype=torch.bool)}])


def test_sample_prompts_map_points_through_the_affine_and_take_masks():
    from mmengine.structures import BaseDataElement

    from groma_px.models.inputs import sample_references

    sample = BaseDataElement(
        metainfo={
            "sample_id": "s",
            "affine": (0.5, 0.0, 0.5, 0.0),  # the original image was 2x larger
            "region_prompts": [{"kind": "point", "point": [40.0, 20.0]}, {"kind": "mask"}, None],
        },
        gt_boxes=torch.tensor([[0.0, 0.0, 30.0, 20.0], [5.0, 5.0, 10.0, 10.0], [1, 1, 9, 9.0]]),
        ref_regions=torch.tensor([0, 1, 2]),
        ref_is_user=torch.tensor([True, True, False]),
        gt_masks=torch.zeros(3, 32, 64, dtype=torch.bool),
    )
    ref = sample_references(sample, torch.tensor([32, 64]))
    assert torch.allclose(ref.user_points[0], torch.tensor([20.0 / 64, 10.0 / 32]))
    assert torch.isnan(ref.user_points[1]).all()
    assert ref.user_masks[0] is None and ref.user_masks[1].shape == (32, 64)
    del sample.gt_masks
    with pytest.raises(ValueError, match="with_mask=True"):
        sample_references(sample, torch.tensor([32, 64]))
    sample.set_metainfo({"region_prompts": [{"kind": "scribble"}, None, None]})
    with pytest.raises(ValueError, match="scribble"):
        sample_references(sample, torch.tensor([32, 64]))


def test_mask_point_lies_inside_a_non_convex_mask():
    from groma_px.region_encoder.prompts import mask_point

    ring = torch.zeros(9, 9, dtype=torch.bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # the centroid (4, 4) is a hole
    x, y = mask_point(ring)
    assert ring[int(y), int(x)]
    with pytest.raises(ValueError, match="empty mask"):
        mask_point(torch.zeros(3, 3, dtype=torch.bool))
