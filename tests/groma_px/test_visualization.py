"""Drawing regions, masks and grounded answers."""

import numpy as np
from pycocotools import mask as mask_utils

from groma_px.structures import GroundedRegion, GroundedResponse, GroundedSpan
from groma_px.visualization import add_caption, draw_regions, draw_response
from groma_px.visualization.draw import _record_labels
from region_proposer.visualization import PALETTE


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode()}


def test_box_outline_and_mask_overlay_in_region_colour():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=bool)
    mask[25:35, 40:50] = True
    out = np.array(
        draw_regions(image, [[10, 10, 30, 20], [40, 25, 50, 35]], None, [None, _rle(mask)])
    )
    assert tuple(out[10, 15]) == PALETTE[0]  # top edge of box 0
    assert tuple(out[15, 20]) == (0, 0, 0)  # inside box 0, untouched
    tinted = out[30, 45].astype(int)
    assert tinted.sum() > 0 and tuple(out[5, 5]) == (0, 0, 0)  # mask pixels tinted, others not
    assert np.argmax(tinted) == np.argmax(PALETTE[1])
    assert image.sum() == 0  # input not modified


def test_draw_response_labels_regions_by_phrase():
    resp = GroundedResponse(
        text="the cat",
        spans=(GroundedSpan(0, 7, (0,)),),
        regions=(GroundedRegion((2, 2, 20, 20), 0.8, "proposer"),),
    )
    out = draw_response(np.full((30, 30, 3), 255, dtype=np.uint8), resp)
    assert out.size == (30, 30)
    assert tuple(np.array(out)[2, 10]) == PALETTE[0]


def test_record_labels_follow_placeholder_order():
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\\nWhat is <roi><refer_box></roi>?", "regions": [3]},
            {
                "from": "gpt",
                "value": "<p>a dog</p><roi><ground_box><ground_box></roi> near "
                "<p>a cat</p><roi><ground_box></roi>",
                "regions": [2, 0, 1],
            },
        ]
    }
    assert _record_labels(record) == {2: "a dog", 0: "a dog", 1: "a cat"}


def test_caption_band_grows_image():
    from PIL import Image

    image = Image.new("RGB", (80, 40), "red")
    out = add_caption(image, ["one line", "x" * 200])
    assert out.width == 80 and out.height > 40 + 3 * 8
    assert out.getpixel((5, 5)) == (255, 0, 0)
