"""Every proposer preset builds on the tiny stage-1 config and runs forward and loss; the
paper-scale config builds on the meta device."""

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import BaseDataElement, InstanceData

from region_proposer.proposers.cached import write_proposal_cache
from region_proposer.registry import MODELS
from region_proposer.runtime import apply_cfg_options

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "proposer" / "ddetr_vit-tiny_synthetic.py"
PRESETS = sorted(
    str(p.relative_to(CONFIGS).with_suffix(""))
    for folder in ("_base_/proposers", "tiny/proposers")
    for p in (CONFIGS / folder).glob("*.py")
)


def _batch(source, sizes=((128, 160), (128, 144))):
    inputs, samples = [], []
    for i, (h, w) in enumerate(sizes):
        inputs.append(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
        sample = BaseDataElement(
            metainfo=dict(sample_id=f"toy/{i}", source=source, ori_shape=(h, w), img_shape=(h, w))
        )
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[4.0, 6.0, 30.0, 40.0]] * (i + 1)), labels=torch.arange(i + 1)
        )
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def _cache(tmp_path):
    items = [
        (f"toy/{i}", torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([0.9]), None)
        for i in range(2)
    ]
    path = tmp_path / "cache.safetensors"
    write_proposal_cache(path, items, config_hash="0" * 16, proposer="test")
    return str(path)


def test_presets_found():
    assert {
        "_base_/proposers/ddetr",
        "tiny/proposers/ddetr",
        "tiny/proposers/gt",
        "tiny/proposers/rpn",
        "tiny/proposers/detr",
        "_base_/proposers/cached",
    } <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_forward_and_loss(preset, tmp_path):
    cfg = Config.fromfile(str(TINY))
    apply_cfg_options(cfg, {"preset": preset})
    if cfg.model.proposer.type == "CachedProposer":
        cfg.model.proposer.path = _cache(tmp_path)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("region_proposer"):
        model = MODELS.build(cfg.model)
    source = cfg.model.proposer.get("objectness", {}).get("sources", ("default",))[0]
    model.train()
    data = model.data_preprocessor(_batch(source), True)
    losses = model(**data, mode="loss")
    assert all(torch.isfinite(v).all() for v in losses.values())
    if model.proposer.trainable:
        total = sum(losses.values())
        total.backward()
        assert any(p.grad is not None for p in model.proposer.parameters())
    model.eval()
    with torch.no_grad():
        samples = model(**model.data_preprocessor(_batch(source), False), mode="predict")
    for sample in samples:
        boxes = sample.pred_instances.bboxes
        h, w = sample.metainfo["ori_shape"]
        assert boxes.shape[-1] == 4 and len(boxes) == len(sample.pred_instances.scores)
        assert (boxes[:, 0] >= -1e-3).all() and (boxes[:, 2] <= w + 1e-3).all()
        assert (boxes[:, 1] >= -1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()


def test_preset_swap_replaces_whole_component():
    cfg = Config.fromfile(str(TINY))
    apply_cfg_options(cfg, {"preset": "tiny/proposers/gt"})
    assert cfg.model.proposer.type == "GroundTruthProposer"
    assert "num_queries" not in cfg.model.proposer
    with pytest.raises(FileNotFoundError, match="preset 'tiny/proposers/nope' not found"):
        apply_cfg_options(cfg, {"preset": "tiny/proposers/nope"})
    with pytest.raises(KeyError, match="did you mean num_queries"):
        apply_cfg_options(Config.fromfile(str(TINY)), {"model.proposer.num_querys": 5})


def test_paper_scale_builds_on_meta_device():
    cfg = Config.fromfile(str(CONFIGS / "proposer" / "ddetr_dinov2-l_448_coco-sa1b.py"))
    with DefaultScope.overwrite_default_scope("region_proposer"), torch.device("meta"):
        model = MODELS.build(cfg.model)
    proposer = model.proposer
    assert proposer.num_queries == 300 and len(proposer.in_channels) == 4
    assert model.backbone.encoder.embed_dim == 1024 and model.backbone.patch_size == 14
    assert model.backbone.encoder.num_blocks == 24
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params > 300e6  # ViT-L alone is ~304M
