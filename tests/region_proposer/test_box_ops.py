"""Box-format conversions against hand-computed cases."""

import pytest
import torch

from region_proposer.box_ops import BOX_FORMATS, convert_boxes, denormalize_boxes, normalize_boxes

# One box in a 200 (H) x 400 (W) image: x from 40 to 120, y from 20 to 100.
IMAGE_SIZE = (200, 400)
CASES = {
    "abs_xyxy": [40.0, 20.0, 120.0, 100.0],
    "abs_xywh": [40.0, 20.0, 80.0, 80.0],
    "abs_cxcywh": [80.0, 60.0, 80.0, 80.0],
    "norm_xyxy": [0.1, 0.1, 0.3, 0.5],
    "norm_xywh": [0.1, 0.1, 0.2, 0.4],
    "norm_cxcywh": [0.2, 0.3, 0.2, 0.4],
}


@pytest.mark.parametrize("src", BOX_FORMATS)
@pytest.mark.parametrize("dst", BOX_FORMATS)
def test_every_pair_matches_hand_computed(src, dst):
    out = convert_boxes(torch.tensor([CASES[src]]), src=src, dst=dst, image_size=IMAGE_SIZE)
    torch.testing.assert_close(out, torch.tensor([CASES[dst]]))


def test_batched_per_image_sizes():
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]], [[0.0, 0.0, 0.5, 0.25]]])  # (B=2, N=1, 4)
    sizes = torch.tensor([[100, 200], [40, 80]])
    out = denormalize_boxes(boxes, sizes)
    torch.testing.assert_close(
        out, torch.tensor([[[100.0, 50.0, 200.0, 100.0]], [[0.0, 0.0, 40.0, 10.0]]])
    )
    torch.testing.assert_close(normalize_boxes(out, sizes), boxes)


def test_keeps_leading_dims_and_empty():
    out = convert_boxes(torch.zeros(2, 0, 4), src="abs_xywh", dst="abs_xyxy")
    assert out.shape == (2, 0, 4)
    ints = convert_boxes(torch.tensor([[1, 2, 3, 4]]), src="abs_xywh", dst="abs_xyxy")
    torch.testing.assert_close(ints, torch.tensor([[1.0, 2.0, 4.0, 6.0]]))


def test_errors():
    with pytest.raises(ValueError, match="src='xyxy' is not a box format"):
        convert_boxes(torch.zeros(1, 4), src="xyxy", dst="norm_xyxy")
    with pytest.raises(ValueError, match="image_size is required"):
        convert_boxes(torch.zeros(1, 4), src="abs_xyxy", dst="norm_xyxy")
    with pytest.raises(ValueError, match="shape"):
        convert_boxes(torch.zeros(1, 5), src="abs_xyxy", dst="abs_xywh")
    with pytest.raises(ValueError, match="positive"):
        normalize_boxes(torch.zeros(1, 4), (0, 10))
