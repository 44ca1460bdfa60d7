"""Pure model inputs of GromaPX: the embedding splice, a sample's user/GT references, and the
image tokenizer (groma_px/models/inputs.py, groma_px/vision/image_tokenizer.py)."""

from __future__ import annotations

import pytest
import torch
from mmengine.structures import BaseDataElement

from groma_px.models.inputs import sample_references, splice_features
from groma_px.vision.image_tokenizer import ImageTokenizer
from region_proposer.structures import FeaturePyramid


# ------------------------------------------------------------------------------ splice_features
def _splice_inputs(region_add: bool) -> dict:
    """B=2, L=8, D=3, G=2 image tokens; sample 0 cites its rows 1, 0; sample 1 its row 0."""
    gen = torch.Generator().manual_seed(0)
    image_slots = torch.zeros(2, 8, dtype=torch.bool)
    image_slots[0, 1:3] = True
    image_slots[1, 4:6] = True
    region_slots = torch.full((2, 8), -1)
    region_slots[0, 4], region_slots[0, 6], region_slots[1, 1] = 1, 0, 0
    return dict(
        embeds=torch.randn(2, 8, 3, generator=gen),
        image_slots=image_slots,
        image_feats=torch.randn(2, 2, 3, generator=gen),
        region_slots=region_slots,
        region_add=torch.full((2, 8), region_add),
        region_feats=torch.randn(3, 3, generator=gen),  # rows 0-1: sample 0, row 2: sample 1
        region_offsets=torch.tensor([0, 2]),
    )


@pytest.mark.parametrize("region_add", [False, True], ids=["pair", "fused"])
def test_splice_features_places_image_and_region_features(region_add):
    args = _splice_inputs(region_add)
    embeds, image, regions = args["embeds"], args["image_feats"], args["region_feats"]
    out = splice_features(**args)
    expected = embeds.clone()
    expected[0, 1:3] = image[0]  # image slots in order
    expected[1, 4:6] = image[1]
    for (b, pos), row in {(0, 4): 1, (0, 6): 0, (1, 1): 2}.items():
        expected[b, pos] = regions[row] + (embeds[b, pos] if region_add else 0)
    torch.testing.assert_close(out, expected)
    assert torch.equal(args["embeds"], embeds)  # no in-place writes


def test_splice_features_without_regions():
    args = _splice_inputs(False)
    empty = torch.zeros(0, 3, requires_grad=True)
    args.update(region_slots=torch.full((2, 8), -1), region_feats=empty)
    out = splice_features(**args)
    untouched = ~args["image_slots"]
    assert torch.equal(out[untouched], args["embeds"][untouched])
    assert torch.equal(out[0, 1:3], args["image_feats"][0])
    # The empty region tokens stay in the graph (their encoder gets a gradient, as DDP needs).
    out.sum().backward()
    assert empty.grad is not None
    # A sequence that cites a region feature when the batch has none is an error.
    args["region_slots"][1, 1] = 0
    with pytest.raises(ValueError, match="no regions"):
        splice_features(**args)


def test_splice_features_rejects_wrong_image_slot_count():
    args = _splice_inputs(False)
    args["image_slots"][1, 6] = True  # 3 slots for G=2 tokens
    with pytest.raises(ValueError, match="3 image slots; expected 0 or 2"):
        splice_features(**args)
    args["image_slots"][1] = False  # a text-only sequence is fine
    assert splice_features(**args).shape == (2, 8, 3)


# ------------------------------------------------------------------------------ sample_references
def _sample(refs, is_user, sample_id="toy/0"):
    sample = BaseDataElement(metainfo={"sample_id": sample_id})
    sample.gt_boxes = torch.tensor(
        [[0.0, 0.0, 20.0, 10.0], [10.0, 5.0, 40.0, 20.0], [30.0, 10.0, 50.0, 30.0]]
    )
    sample.ref_regions = torch.tensor(refs, dtype=torch.long)
    sample.ref_is_user = torch.tensor(is_user, dtype=torch.bool)
    return sample


def test_sample_references_splits_user_and_gt():
    # Region 1 is cited by the human and again by the answer: it stays a user region.
    refs = sample_references(
        _sample([1, 2, 1, 0], [True, False, False, False]), torch.tensor([40, 50])
    )
    scale = torch.tensor([50.0, 40.0, 50.0, 40.0])
    torch.testing.assert_close(refs.user_boxes, torch.tensor([[10.0, 5.0, 40.0, 20.0]]) / scale)
    torch.testing.assert_close(
        refs.gt_boxes, torch.tensor([[30.0, 10.0, 50.0, 30.0], [0.0, 0.0, 20.0, 10.0]]) / scale
    )
    assert refs.record_ids.tolist() == [1, 2, 0]
    assert refs.placeholder_ids.tolist() == [1, 2, 1, 0]
    # The selector maps (user, then GT) reference boxes to kept rows 5, 6, 7.
    assert refs.placeholder_rows(torch.tensor([5, 6, 7])).tolist() == [5, 6, 5, 7]


def test_sample_references_without_citations():
    refs = sample_references(_sample([], []), torch.tensor([40, 50]))
    assert refs.user_boxes.shape == refs.gt_boxes.shape == (0, 4)
    assert refs.placeholder_rows(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_sample_references_out_of_range_names_sample():
    with pytest.raises(ValueError, match=r"sample 'toy/7' cites regions \[3\] but has 3 regions"):
        sample_references(_sample([0, 3], [True, False], "toy/7"), torch.tensor([40, 50]))


# ------------------------------------------------------------------------------ ImageTokenizer
@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_image_tokenizer_shape(mode):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(in_channels=6, out_dim=10, grid=3, mode=mode)
    maps = [torch.randn(2, 6, 8, 10), torch.randn(2, 6, 4, 5)]
    tokens = tokenizer(FeaturePyramid.from_maps(maps, image_size=(64, 80)))
    assert tokens.shape == (2, 9, 10) and tokenizer.num_tokens == 9


@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_image_tokenizer_ignores_padding(mode):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(in_channels=4, out_dim=8, grid=2, mode=mode)
    image = torch.randn(4, 5, 3)  # valid cells of a 40 x 24 image at stride 8
    small = torch.zeros(1, 4, 6, 6)
    small[0, :, :5, :3] = image
    large = torch.randn(2, 4, 10, 8) * 100  # padded larger, garbage in the padding
    large[0, :, :5, :3] = image
    sizes = torch.tensor([[40, 24]])
    tokens_small = tokenizer(FeaturePyramid.from_maps([small], (48, 48), sizes))
    tokens_large = tokenizer(
        FeaturePyramid.from_maps([large], (80, 64), torch.tensor([[40, 24], [80, 64]]))
    )
    torch.testing.assert_close(tokens_large[0], tokens_small[0])
    # Without valid sizes the padding is read, and the tokens change.
    unmasked = tokenizer(FeaturePyramid.from_maps([large], (80, 64)))
    assert not torch.allclose(unmasked[0], tokens_small[0])


def test_image_tokenizer_rejects_bad_args():
    with pytest.raises(ValueError, match="mode must be one of"):
        ImageTokenizer(in_channels=4, out_dim=8, mode="mean")
    with pytest.raises(ValueError, match="grid, in_channels, out_dim >= 1"):
        ImageTokenizer(in_channels=4, out_dim=8, grid=0)
    tokenizer = ImageTokenizer(in_channels=4, out_dim=8, level=2)
    with pytest.raises(IndexError, match="level 2 outside a 1-level pyramid"):
        tokenizer(FeaturePyramid.from_maps([torch.zeros(1, 4, 2, 2)], (32, 32)))
