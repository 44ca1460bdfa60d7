"""Mask heads, mask losses, the GromaPX mask path and masks mapped back to original pixels."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from groma_px.llm.generation import GenerationOutput
from groma_px.mask_head import LLMMaskHead, QueryMaskHead, mask_losses, point_sample
from groma_px.models.masks import first_citations, logits_to_rle
from region_proposer.structures import FeaturePyramid

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS = [QueryMaskHead, LLMMaskHead]


def _pyramid(batch=2, channels=8):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(batch, channels, 8, 8, generator=gen), torch.randn(batch, channels, 4, 4)]
    return FeaturePyramid.from_maps(maps, image_size=(64, 64))


def _head(cls, **kwargs):
    torch.manual_seed(0)
    args = dict(in_channels=8, num_levels=2, region_dim=16, embed_dim=8, hidden_dim=16)
    return cls(**{**args, **kwargs})


@pytest.mark.parametrize("cls", HEADS)
@pytest.mark.parametrize("stride", [2, 4])
def test_heads_give_one_mask_per_region_at_their_stride(cls, stride):
    head = _head(cls, mask_stride=stride, levels=(0, 1))
    image = torch.randn(2, 3, 64, 64)
    pixels = head.pixel_embeddings(_pyramid(), image)
    assert pixels.shape == (2, 8, 64 // stride, 64 // stride)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 20.0, 60.0, 50.0], [0, 0, 64, 64]])
    index = torch.tensor([0, 1, 1])
    feats, hidden = torch.randn(3, 16), torch.randn(3, 16)
    logits = head(pixels, index, boxes, feats, (64, 64), hidden=hidden)
    assert logits.shape == (3, 64 // stride, 64 // stride)
    # The box enters through relative coordinates: another box, another mask.
    moved = head(pixels, index, boxes + 3.0, feats, (64, 64), hidden=hidden)
    assert not torch.allclose(logits, moved)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    empty = head(pixels, index[:0], boxes[:0], feats[:0], (64, 64), hidden=hidden[:0])
    assert empty.shape == (0, 64 // stride, 64 // stride)


def test_llm_head_reads_the_hidden_state_and_needs_it():
    head = _head(LLMMaskHead)
    pixels = head.pixel_embeddings(_pyramid(), torch.randn(2, 3, 64, 64))
    args = (pixels, torch.tensor([0]), torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.randn(1, 16))
    a = head(*args, (64, 64), hidden=torch.zeros(1, 16))
    b = head(*args, (64, 64), hidden=torch.ones(1, 16))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="hidden state"):
        head(*args, (64, 64))
    query = _head(QueryMaskHead)
    assert torch.equal(
        query(*args, (64, 64), hidden=torch.zeros(1, 16)),
        query(*args, (64, 64), hidden=torch.ones(1, 16)),
    )


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="power of two"):
        _head(QueryMaskHead, mask_stride=3)
    with pytest.raises(ValueError, match="levels"):
        _head(QueryMaskHead, levels=(2,))


def test_point_sample_is_bilinear_over_cell_centres():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # Cell centres are at 0.25 and 0.75; the image centre averages all four cells.
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])
    assert point_sample(maps, points).tolist() == [[0.0, 1.0, 2.0, 1.5]]


def test_mask_losses_prefer_the_right_mask_and_handle_none():
    torch.manual_seed(0)
    target = torch.zeros(1, 32, 32)
    target[0, 8:24, 4:20] = 1.0
    extents = torch.tensor([[1.0, 1.0]])
    right = mask_losses(target * 20 - 10, target, extents, num_points=256)
    wrong = mask_losses(10 - target * 20, target, extents, num_points=256)
    # Importance sampling puts most points on the edge, where bilinear logits cross 0.
    assert right["loss_mask_bce"] < 0.3 and right["loss_mask_dice"] < 0.1
    assert wrong["loss_mask_bce"] > 5 and wrong["loss_mask_dice"] > 0.9
    logits = torch.zeros(0, 8, 8, requires_grad=True)
    none = mask_losses(logits, torch.zeros(0, 32, 32), torch.zeros(0, 2))
    assert none["loss_mask_bce"].item() == 0.0
    none["loss_mask_bce"].backward()


def test_points_stay_inside_the_image_extent():
    from groma_px.mask_head import sample_points

    points = sample_points(torch.randn(3, 16, 16), torch.tensor([[0.5, 1.0]] * 3), 100)
    assert points.shape == (3, 100, 2)
    assert points[..., 0].max() <= 0.5 and points[..., 1].max() <= 1.0 and points.min() >= 0


def test_logits_map_back_to_original_pixels_through_the_affine():
    # Original 40x60 image resized by 0.5 to 20x30, padded to 32x32; logits at stride 1.
    logits = torch.full((32, 32), -10.0)
    logits[5:15, 10:20] = 10.0  # resized-image rows 5..14, cols 10..19
    meta = {"ori_shape": (40, 60), "affine": (0.5, 0.0, 0.5, 0.0)}
    mask = mask_utils.decode(logits_to_rle(logits, (32, 32), meta))
    expected = np.zeros((40, 60), dtype=np.uint8)
    expected[10:30, 20:40] = 1
    assert mask.shape == (40, 60) and np.array_equal(mask, expected)
    # A horizontal flip (x' = -0.5 x + 30) mirrors it back.
    flipped = torch.flip(logits[:, :30], dims=[1])
    padded = torch.full((32, 32), -10.0)
    padded[:, :30] = flipped
    meta_flip = {"ori_shape": (40, 60), "affine": (-0.5, 30.0, 0.5, 0.0)}
    assert np.array_equal(mask_utils.decode(logits_to_rle(padded, (32, 32), meta_flip)), expected)


def test_first_citations_keep_the_first_step_of_each_existing_row():
    cols = torch.tensor([50, 51, 52])
    tokens = torch.tensor([1, 51, 2, 50, 51, 52, 9])
    assert first_citations(tokens, cols, num_rows=2) == [(1, 1), (0, 3)]


@pytest.mark.parametrize("cls", HEADS)
def test_pixel_embeddings_of_selected_images_equal_their_rows_of_the_batch(cls):
    # GromaPX embeds only the images an answer cites: each image's pixels must not depend on
    # its batch-mates.
    head = _head(cls, mask_stride=4, levels=(0, 1))
    pyramid = FeaturePyramid.from_maps(
        [torch.randn(3, 8, 8, 8), torch.randn(3, 8, 4, 4)],
        image_size=(64, 64),
        valid_sizes=torch.tensor([[64, 64], [40, 64], [64, 30]]),
    )
    image = torch.randn(3, 3, 64, 64)
    index = torch.tensor([2, 0])
    chosen = pyramid.select(index)
    assert torch.equal(chosen.valid_sizes, pyramid.valid_sizes[index])
    assert chosen.strides == pyramid.strides and chosen.image_size == pyramid.image_size
    full = head.pixel_embeddings(pyramid, image)
    torch.testing.assert_close(head.pixel_embeddings(chosen, image[index]), full[index])


def _with_box_masks(batch):
    """Adds box-shaped gt_masks (one per record region) to packed train samples."""
    for sample in batch["data_samples"]:
        h, w = sample.metainfo["img_shape"]
        masks = torch.zeros(len(sample.gt_boxes), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(sample.gt_boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        sample.gt_masks = masks
        sample.gt_mask_valid = torch.ones(len(masks), dtype=torch.bool)
    return batch


@pytest.mark.parametrize("head", ["QueryMaskHead", "LLMMaskHead"])
def test_groma_px_mask_loss_trains_the_head_and_predict_attaches_masks(
    build_model, make_batch, head
):
    model = build_model(
        selector=dict(score_thr=0.0),
        region_head="pointer",
        mask_head=dict(type=head, embed_dim=16),
        mask_loss=dict(num_points=64),
    )
    batch = _with_box_masks(make_batch((0, 10, 15)))
    losses = model(**model.data_preprocessor(batch, True), mode="loss")
    assert {"loss_mask_bce", "loss_mask_dice"} <= set(losses)
    assert losses["loss_mask_bce"].item() > 0
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(p.grad is not None for p in model.mask_head.parameters())
    # Without gt_masks there is nothing to supervise (zero, still in the graph).
    batch = make_batch((0, 10))
    for sample in batch["data_samples"]:
        if "gt_masks" in sample:
            del sample.gt_masks
    plain = model(**model.data_preprocessor(batch, True), mode="loss")
    assert plain["loss_mask_bce"].item() == 0.0 and plain["loss_mask_bce"].requires_grad

    model.eval()
    data = model.data_preprocessor(make_batch([0, 1], "test"), False)
    with torch.no_grad():
        perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        prompt = model._embed(perception, data["data_samples"], padding_side="left")
        cols = model._region_cols
        tokens = torch.tensor([[5, int(cols[1]), 6, int(cols[0])], [7, 8, 9, 10]])
        gen = GenerationOutput(tokens, torch.randn(2, 4, model.llm.hidden_size))
        embedded = []
        hook = model.mask_head.pixel_out.register_forward_hook(
            lambda m, args, out: embedded.append(len(out))
        )
        masks = model._predict_masks(perception, prompt, data["inputs"], gen, data["data_samples"])
        hook.remove()
    assert sorted(masks[0]) == [0, 1] and masks[1] == {}
    assert embedded == [1]  # pixel embeddings of the one image that cites regions
    h, w = data["data_samples"][0].metainfo["ori_shape"]
    assert mask_utils.decode(masks[0][1]).shape == (h, w)


def test_cited_subset_keeps_at_most_the_limit_in_batch_order():
    from groma_px.models.masks import CitedRegions

    cited = CitedRegions(*(torch.arange(10) for _ in range(4)))
    torch.manual_seed(0)
    sub = cited.subset(4)
    assert len(sub) == 4 and torch.equal(sub.batch_index, sub.batch_index.sort().values)
    assert torch.equal(sub.rows, sub.gt_index) and cited.subset(None) is cited
    assert cited.subset(20) is cited
