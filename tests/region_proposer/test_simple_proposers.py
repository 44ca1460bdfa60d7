"""GroundTruthProposer, RPNProposer and CachedProposer (with ``write_proposal_cache``)."""

import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from mmengine.structures import InstanceData

from region_proposer.proposers import cached as cached_module
from region_proposer.proposers.cached import CachedProposer, config_hash, write_proposal_cache
from region_proposer.proposers.ground_truth import GroundTruthProposer
from region_proposer.proposers.rpn import RPNProposer
from region_proposer.registry import MODELS
from region_proposer.structures import FeaturePyramid, Proposals


def pyramid(batch: int, image_size=(32, 32), valid_sizes=None, channels=8, strides=(4,)):
    height, width = image_size
    maps = [
        torch.randn(batch, channels, math.ceil(height / s), math.ceil(width / s)) for s in strides
    ]
    sizes = None if valid_sizes is None else torch.tensor(valid_sizes)
    return FeaturePyramid.from_maps(maps, image_size, sizes)


def instance(boxes, sample_id=None, **meta) -> InstanceData:
    if sample_id is not None:
        meta["sample_id"] = sample_id
    return InstanceData(
        metainfo=meta, bboxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    )


def random_gt(num: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(num, 2, 2, generator=gen).sort(dim=1).values
    return corners.reshape(num, 4)


# --------------------------------------------------------------------------- GroundTruthProposer


def test_gt_exact_boxes_without_corruption():
    gt = random_gt(3, 0)
    props = GroundTruthProposer(shuffle=False)(pyramid(2), [instance(gt), instance(gt[:1])])
    assert props.boxes.shape == (2, 3, 4) and props.valid.sum(1).tolist() == [3, 1]
    torch.testing.assert_close(props.boxes[0], gt)
    assert bool((props.scores[props.valid] == 1.0).all()) and not any(
        True for _ in GroundTruthProposer().parameters()
    )


def test_gt_deterministic_per_sample_across_batch_orders():
    proposer = GroundTruthProposer(jitter=0.1, drop_rate=0.3, num_distractors=2, seed=7)
    insts = {name: instance(random_gt(5, i), name) for i, name in enumerate("abc")}
    first = proposer(pyramid(2), [insts["a"], insts["b"]])
    second = proposer(pyramid(3), [insts["c"], insts["b"], insts["a"]])
    for i, j in ((0, 2), (1, 1)):
        torch.testing.assert_close(first.boxes[i][first.valid[i]], second.boxes[j][second.valid[j]])
        torch.testing.assert_close(
            first.scores[i][first.valid[i]], second.scores[j][second.valid[j]]
        )
    other_seed = GroundTruthProposer(jitter=0.1, drop_rate=0.3, num_distractors=2, seed=8)
    assert not torch.equal(other_seed(pyramid(1), [insts["a"]]).boxes[0], first.boxes[0])


def test_gt_jitter_stays_inside_image():
    gt = torch.tensor([[0.0, 0.0, 0.3, 0.2], [0.7, 0.8, 1.0, 1.0], [0.2, 0.2, 0.9, 0.9]]).repeat(
        50, 1
    )
    props = GroundTruthProposer(jitter=0.5)(pyramid(1), [instance(gt, "x")])
    boxes = props.boxes[props.valid]
    assert bool((boxes >= 0).all()) and bool((boxes <= 1).all())
    assert bool((boxes[:, 2:] >= boxes[:, :2]).all())
    assert not torch.allclose(boxes.sort(0).values, gt.sort(0).values)


def test_gt_drop_rate_statistics():
    props = GroundTruthProposer(drop_rate=0.3, seed=1)(
        pyramid(1), [instance(random_gt(4000, 1), "s")]
    )
    kept = int(props.valid.sum())
    assert abs(kept / 4000 - 0.7) < 0.03  # ~4.6 binomial standard deviations


def test_gt_distractors_score_lower():
    proposer = GroundTruthProposer(num_distractors=5, distractor_score=0.2)
    props = proposer(pyramid(2), [instance(random_gt(3, 2), "a"), instance(torch.zeros(0, 4), "b")])
    assert props.valid.sum(1).tolist() == [8, 5]
    scores = props.scores[0][props.valid[0]]
    assert (scores == 0.2).sum() == 5 and (scores == 1.0).sum() == 3
    assert bool((props.scores[1][props.valid[1]] == 0.2).all())
    with pytest.raises(ValueError, match="distractor_score"):
        GroundTruthProposer(score=0.5, distractor_score=0.5)


def test_gt_empty_and_errors():
    props, losses = GroundTruthProposer().loss(pyramid(2), [instance([]), instance([])])
    assert props.boxes.shape == (2, 0, 4) and losses == {}
    with pytest.raises(ValueError, match="needs instances"):
        GroundTruthProposer()(pyramid(1))
    with pytest.raises(ValueError, match="bboxes"):
        GroundTruthProposer()(pyramid(1), [InstanceData()])


# --------------------------------------------------------------------------- RPNProposer


def make_rpn(**kwargs) -> RPNProposer:
    cfg = dict(
        type="RPNProposer",
        in_channels=8,
        pre_nms_top_n=dict(training=200, testing=100),
        post_nms_top_n=dict(training=60, testing=40),
        batch_size_per_image=64,
    )
    return MODELS.build({**cfg, **kwargs})


@pytest.mark.parametrize(
    "image_size, valid_sizes", [((64, 64), None), ((200, 250), [[200, 250], [200, 249]])]
)
def test_rpn_shapes_square_and_non_square(image_size, valid_sizes):
    torch.manual_seed(0)
    rpn = make_rpn().eval()
    feats = pyramid(2, image_size, valid_sizes, strides=(4, 8, 16))
    with torch.no_grad():
        props = rpn(feats)
    assert props.boxes.shape == (2, 40, 4) and props.valid.shape == (2, 40)
    assert bool(props.valid.any(1).all())
    boxes = props.boxes[props.valid]
    assert bool((boxes >= 0).all()) and bool((boxes <= 1 + 1e-6).all())
    assert bool((props.scores >= 0).all()) and bool((props.scores <= 1).all())


def test_rpn_anchors_use_fractional_strides():
    # A ViT-14 pyramid level at stride 3.5: integer strides (56 // 16 = 3) would leave the last
    # eighth of the image without anchors.
    feats = pyramid(1, (56, 56), strides=(3.5,))
    anchors = make_rpn(anchor_scales=(4.0,), aspect_ratios=(1.0,))._anchors(feats)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert anchors.shape == (256, 4) and float(centres.max()) == pytest.approx(15 * 3.5)
    torch.testing.assert_close(anchors[0], torch.tensor([-7.0, -7.0, 7.0, 7.0]))


def test_rpn_losses_finite_without_gt():
    feats = pyramid(2, (64, 48), [[64, 48], [40, 48]], strides=(4, 8))
    props, losses = make_rpn().train().loss(feats, [instance([]), instance([])])
    assert set(losses) == {"loss_rpn_objectness", "loss_rpn_box"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert props.boxes.shape == (2, 60, 4)


def test_rpn_every_parameter_gets_a_gradient():
    torch.manual_seed(1)
    rpn = make_rpn(anchor_sizes=((16.0,), (32.0,))).train()
    feats = pyramid(2, (64, 48), [[64, 48], [60, 40]], strides=(4, 8))
    gt = [instance([[0.1, 0.1, 0.5, 0.4], [0.5, 0.5, 0.9, 0.95]]), instance([[0.2, 0.3, 0.6, 0.7]])]
    _, losses = rpn.loss(feats, gt)
    sum(losses.values()).backward()
    for name, param in rpn.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_rpn_validates_channels():
    with pytest.raises(ValueError, match="8 channels on every level"):
        make_rpn()(pyramid(1, channels=4))


# --------------------------------------------------------------------------- CachedProposer


def write_cache(path, with_embeddings=False, hash_="abc123"):
    items = [
        (
            "coco/1",
            random_gt(3, 0),
            torch.tensor([0.9, 0.5, 0.1]),
            torch.ones(3, 6) if with_embeddings else None,
        ),
        (
            "coco/2",
            random_gt(1, 1),
            torch.tensor([0.7]),
            torch.zeros(1, 6) if with_embeddings else None,
        ),
    ]
    write_proposal_cache(path, items, config_hash=hash_, proposer="DeformableDETRProposer")
    return items


@pytest.mark.parametrize("with_embeddings", [False, True])
def test_cache_round_trip(tmp_path, with_embeddings):
    path = tmp_path / "val.safetensors"
    items = write_cache(path, with_embeddings)
    proposer = MODELS.build(
        dict(type="CachedProposer", path=str(path), expected_config_hash="abc123")
    )
    assert (
        proposer.metadata["proposer"] == "DeformableDETRProposer" and "created" in proposer.metadata
    )
    props, losses = proposer.loss(pyramid(2), [instance([], "coco/2"), instance([], "coco/1")])
    assert props.boxes.shape == (2, 3, 4) and props.valid.sum(1).tolist() == [1, 3] and losses == {}
    torch.testing.assert_close(props.boxes[1], items[0][1])
    torch.testing.assert_close(props.scores[0, :1], items[1][2])
    assert (props.embeddings is not None) == with_embeddings
    copy.deepcopy(proposer)  # the memory-mapped handle must not block EMA / DDP copies


def test_cache_missing_id_and_hash_mismatch(tmp_path):
    path = tmp_path / "val.safetensors"
    write_cache(path)
    with pytest.raises(KeyError, match=r"coco/3.*val\.safetensors"):
        CachedProposer(path=str(path))(pyramid(1), [instance([], "coco/3")])
    with pytest.raises(ValueError, match="'abc123'.*'fff000'"):
        CachedProposer(path=str(path), expected_config_hash="fff000")


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "val.safetensors"
    write_cache(path)
    assert os.listdir(tmp_path) == ["val.safetensors"]

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cached_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_cache(path, hash_="new")
    assert os.listdir(tmp_path) == ["val.safetensors"]
    assert CachedProposer(path=str(path)).metadata["config_hash"] == "abc123"


def test_config_hash_is_canonical():
    a = config_hash(dict(type="DeformableDETRProposer", num_queries=300, sizes=(1, 2)))
    b = config_hash({"sizes": [1, 2], "num_queries": 300, "type": "DeformableDETRProposer"})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert config_hash(dict(type="DeformableDETRProposer", num_queries=100)) != a


def test_cache_tool_writes_valid_rows(tmp_path):
    # The tool's glue on a stub model (the Runner part needs a trained stage-1 config).
    spec = importlib.util.spec_from_file_location(
        "cache_proposals", Path(__file__).resolve().parents[2] / "tools" / "cache_proposals.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    proposals = Proposals(
        boxes=random_gt(6, 3).reshape(2, 3, 4),
        scores=torch.rand(2, 3),
        valid=torch.tensor([[True, True, False], [True, False, False]]),
        embeddings=torch.randn(2, 3, 5),
    )

    class StubPretrainer(torch.nn.Module):
        def extract_proposals(self, data):
            return data, proposals

    path = tmp_path / "cache.safetensors"
    items = tool.iter_proposals(StubPretrainer(), [["img/a", "img/b"]])
    write_proposal_cache(path, items, config_hash=config_hash({"type": "Stub"}), proposer="Stub")
    props = CachedProposer(path=str(path))(
        pyramid(2), [instance([], "img/b"), instance([], "img/a")]
    )
    assert props.valid.sum(1).tolist() == [1, 2]
    torch.testing.assert_close(props.boxes[1, :2], proposals.boxes[0, :2])
    torch.testing.assert_close(props.embeddings[0, :1], proposals.embeddings[1, :1])
