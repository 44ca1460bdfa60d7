"""BoxRefiner (the stage-1 RoI stage that tightens proposals from the pixels): geometry in a padded
batch, learning, the stage-1 model's use of it, and clear errors."""

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torchvision.ops import box_iou

from region_proposer.layers import pixel_stem
from region_proposer.pretrain import BoxRefiner
from region_proposer.registry import MODELS
from region_proposer.structures import Proposals

TINY = Path(__file__).resolve().parents[2] / "configs" / "proposer" / "ddetr_vit-tiny_synthetic.py"


def _scene(generator, size=(48, 64)):
    """A dark image with one bright rectangle; its normalised box."""
    h, w = size
    x0, y0 = torch.randint(2, w // 2, (1,), generator=generator), torch.randint(2, h // 2, (1,))
    bw = torch.randint(10, w // 2 - 2, (1,), generator=generator)
    bh = torch.randint(10, h // 2 - 2, (1,), generator=generator)
    image = torch.full((3, h, w), -1.0)
    image[:, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    box = torch.tensor([[x0, y0, x0 + bw, y0 + bh]], dtype=torch.float) / torch.tensor([w, h, w, h])
    return image, box


def test_untrained_refiner_returns_its_boxes():
    refiner = BoxRefiner(roi_size=16)
    boxes = [torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4)]
    out = refiner(torch.randn(2, 3, 40, 56), boxes, torch.tensor([[40, 56], [32, 32]]))
    torch.testing.assert_close(out[0], boxes[0])
    assert out[1].shape == (0, 4)


def test_reads_each_box_in_its_own_image_whatever_the_padding():
    torch.manual_seed(0)
    refiner = BoxRefiner(roi_size=16, num_steps=2)
    torch.nn.init.normal_(refiner.net[-1].weight, std=0.05)  # a refiner that moves boxes
    image = torch.randn(3, 30, 40)
    box = torch.tensor([[0.2, 0.1, 0.7, 0.8]])  # normalised to the unpadded 30x40 image
    alone = refiner(image[None], [box], torch.tensor([[30, 40]]))[0]
    batch = torch.zeros(2, 3, 48, 48)
    batch[0] = torch.randn(3, 48, 48)
    batch[1, :, :30, :40] = image
    others = torch.rand(3, 4).sort(-1).values  # x0 < y0 < x1 < y1: valid boxes
    padded = refiner(batch, [others, box], torch.tensor([[48, 48], [30, 40]]))
    torch.testing.assert_close(padded[1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, box)
    # refined boxes stay valid: ordered corners inside the image
    assert bool((alone[:, 2:] > alone[:, :2]).all()) and bool(((alone >= 0) & (alone <= 1)).all())


def test_learns_to_tighten_jittered_boxes():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    refiner = BoxRefiner(roi_size=16, width=8, hidden_dim=64, train_views=4, jitter=0.12)
    optim = torch.optim.AdamW(refiner.parameters(), lr=3e-3)
    for _ in range(150):
        scenes = [_scene(generator) for _ in range(8)]
        images = torch.stack([s[0] for s in scenes])
        losses = refiner.loss(images, [s[1] for s in scenes], torch.tensor([[48, 64]] * 8))
        optim.zero_grad()
        losses["loss_box_refine"].backward()
        optim.step()
    assert losses["refine_iou"] > losses["refine_iou_in"]
    # new scenes, boxes jittered as in training: two passes bring them much closer
    refiner.eval()
    scenes = [_scene(generator) for _ in range(32)]
    images = torch.stack([s[0] for s in scenes])
    truth = torch.cat([s[1] for s in scenes])
    loose = refiner.jittered(truth)[: len(truth)]
    with torch.no_grad():
        tight = torch.cat(refiner(images, list(loose[:, None]), torch.tensor([[48, 64]] * 32)))
    before = box_iou(loose, truth).diagonal().mean()
    after = box_iou(tight, truth).diagonal().mean()
    assert after > before + 0.1, (before, after)
    assert after > 0.8


def test_empty_batch_loss_reaches_every_weight():
    refiner = BoxRefiner(roi_size=16)
    losses = refiner.loss(torch.randn(1, 3, 16, 16), [torch.zeros(0, 4)], torch.tensor([[16, 16]]))
    losses["loss_box_refine"].backward()
    assert losses["loss_box_refine"].item() == 0.0
    assert all(p.grad is not None for p in refiner.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(roi_size=12), "multiple of 8"),
        (dict(context=0.9), "context must be >= 1"),
        (dict(train_views=0), "train_views >= 1"),
        (dict(jitter=0.6), "0 <= jitter < 0.5"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BoxRefiner(**kwargs)


def test_mismatched_inputs_are_named():
    refiner = BoxRefiner(roi_size=16)
    image, sizes = torch.randn(2, 3, 16, 16), torch.tensor([[16, 16], [16, 16]])
    with pytest.raises(ValueError, match="2 images, 1 box sets"):
        refiner(image, [torch.zeros(1, 4)], sizes)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be \(K, 4\)"):
        refiner(image, [torch.zeros(1, 4), torch.zeros(4)], sizes)
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        refiner(torch.randn(2, 16, 16), [torch.zeros(1, 4)] * 2, sizes)


def test_stage1_model_applies_the_refiner_to_every_proposal():
    cfg = Config.fromfile(TINY)
    assert cfg.model.box_refiner is not None  # the tiny pipeline's default
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("region_proposer"):
        model = MODELS.build(cfg.model)
        without = MODELS.build(dict(cfg.model, box_refiner=None))
    without.load_state_dict(model.state_dict(), strict=False)
    model.eval(), without.eval()
    assert model.box_refiner.score_thr == cfg.model.box_refiner.score_thr > 0
    model.box_refiner.score_thr = 0.0  # an untrained proposer scores every box low
    inputs, sizes = torch.randn(2, 3, 128, 128), torch.tensor([[128, 128], [96, 128]])
    with torch.no_grad():
        base = without(inputs, valid_sizes=sizes, mode="tensor")
        same = model(inputs, valid_sizes=sizes, mode="tensor")
        torch.nn.init.normal_(model.box_refiner.net[-1].weight, std=0.05)
        moved = model(inputs, valid_sizes=sizes, mode="tensor")
    torch.testing.assert_close(same.boxes, base.boxes, rtol=0, atol=1e-6)  # starts as identity
    assert not torch.allclose(moved.boxes, base.boxes)
    torch.testing.assert_close(moved.scores, base.scores)
    expected = model.box_refiner.refine_proposals(inputs, base, sizes)
    torch.testing.assert_close(moved.boxes, expected.boxes)


def test_refines_only_the_proposals_scoring_above_its_threshold():
    torch.manual_seed(0)
    refiner = BoxRefiner(roi_size=16, score_thr=0.3)
    torch.nn.init.normal_(refiner.net[-1].weight, std=0.05)
    boxes = torch.rand(2, 5, 4).sort(-1).values
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.31, 0.1], [0.05, 0.6, 0.3, 0.8, 0.95]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False  # padding keeps its box whatever its score
    proposals = Proposals(boxes=boxes, scores=scores, valid=valid)
    image, sizes = torch.randn(2, 3, 40, 40), torch.tensor([[40, 40], [32, 40]])
    out = refiner.refine_proposals(image, proposals, sizes)
    chosen = valid & (scores >= 0.3)
    torch.testing.assert_close(out.boxes[~chosen], boxes[~chosen])
    assert not torch.isclose(out.boxes[chosen], boxes[chosen]).all(-1).any()
    alone = refiner(image, [boxes[0][chosen[0]], boxes[1][chosen[1]]], sizes)
    torch.testing.assert_close(out.boxes[chosen], torch.cat(alone))
    assert out.scores is proposals.scores and out.valid is proposals.valid


def test_pixel_stem_widths_and_side():
    stem = torch.nn.Sequential(*pixel_stem(4, (1, 2, 4)))
    assert stem(torch.randn(2, 3, 15, 15)).shape == (2, 16, 4, 4)  # ceil(15 / 4)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(4, 1), (8, 2), (16, 2)]
    with pytest.raises(ValueError, match="multipliers >= 1"):
        pixel_stem(4, (1, 0))
