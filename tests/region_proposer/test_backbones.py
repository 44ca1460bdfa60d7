"""Tests for the ViT encoders, the simple feature pyramid and ``VisionBackbone`` (tiny, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mmengine.model import BaseModule
from safetensors.torch import save_file

from region_proposer.backbones import (
    HFDinov2Encoder,
    SimpleFeaturePyramid,
    TimmViTEncoder,
    VisionBackbone,
)
from region_proposer.registry import MODELS

TIMM_CFG = dict(
    type="TimmViTEncoder",
    model_name="vit_tiny_patch16_224",
    img_size=56,
    depth=2,
    embed_dim=32,
    num_heads=2,
    patch_size=14,
)
HF_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    intermediate_size=64,
    image_size=56,
)
HF_CFG = dict(type="HFDinov2Encoder", config=HF_CONFIG)
ENCODERS = {"timm": TIMM_CFG, "hf": HF_CFG}
OUTPUTS = dict(
    proposer=dict(blocks=(-2, -1), fuse="mean", out_channels=16),
    region_encoder=dict(blocks=(-2, -1), fuse="levels", scales=(2.0, 1.0), out_channels=8),
)


def build_backbone(encoder: dict, outputs: dict | None = None) -> VisionBackbone:
    torch.manual_seed(0)
    cfg = dict(type="VisionBackbone", encoder=encoder, outputs=outputs or OUTPUTS)
    return MODELS.build(cfg)


def build_encoder(cfg: dict, **overrides: object) -> TimmViTEncoder | HFDinov2Encoder:
    torch.manual_seed(0)
    return MODELS.build({**cfg, **overrides})


def reference_blocks(encoder: TimmViTEncoder | HFDinov2Encoder, images: torch.Tensor) -> list:
    """All block outputs as (B, C, h, w), straight from timm / transformers."""
    if isinstance(encoder, TimmViTEncoder):
        return encoder.model.forward_intermediates(
            images, indices=None, output_fmt="NCHW", intermediates_only=True
        )
    hidden = encoder.model(pixel_values=images, output_hidden_states=True).hidden_states
    h, w = images.shape[-2] // 14, images.shape[-1] // 14
    return [t[:, 1:].reshape(len(images), h, w, -1).permute(0, 3, 1, 2) for t in hidden[1:]]


@pytest.mark.parametrize("name", ["timm", "hf"])
@pytest.mark.parametrize("size", [(112, 140), (98, 126)])
def test_shapes_and_strides(name: str, size: tuple[int, int]) -> None:
    backbone = build_backbone(ENCODERS[name])
    valid_sizes = torch.tensor([list(size), [50, 60]])
    pyramids = backbone(torch.randn(2, 3, *size), valid_sizes)
    h, w = size[0] // 14, size[1] // 14
    expected = {
        "proposer": [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (math.ceil(h / 2), math.ceil(w / 2))],
        "region_encoder": [(2 * h, 2 * w), (h, w)],
    }
    assert set(pyramids) == {"proposer", "region_encoder"}
    for consumer, shapes in expected.items():
        pyramid = pyramids[consumer]
        assert [tuple(m.shape[-2:]) for m in pyramid.maps] == shapes
        assert pyramid.channels == (backbone.out_channels(consumer),) * len(shapes)
        assert pyramid.strides == tuple(size[0] / s[0] for s in shapes)
        assert pyramid.image_size == size
        assert torch.equal(pyramid.valid_sizes, valid_sizes)
    assert backbone.patch_size == 14


def test_consumers_share_one_encoder_pass() -> None:
    backbone = build_backbone(TIMM_CFG)
    calls = []
    backbone.encoder.register_forward_hook(lambda *args: calls.append(1))
    pyramids = backbone(torch.randn(1, 3, 56, 56))
    assert len(pyramids) == 2 and len(calls) == 1


@pytest.mark.parametrize("name", ["timm", "hf"])
def test_block_selection_matches_library(name: str) -> None:
    encoder = build_encoder(ENCODERS[name]).eval()
    images = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        reference = reference_blocks(encoder, images)
        last, first, last_again = encoder.forward_blocks(images, (-1, 0, 1))
    assert last.shape == (2, 32, 7, 9)
    torch.testing.assert_close(last, reference[-1])
    torch.testing.assert_close(first, reference[0])
    torch.testing.assert_close(last_again, reference[1])


def test_mean_fusion_is_mean_of_blocks() -> None:
    backbone = build_backbone(TIMM_CFG).eval()
    images = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        blocks = backbone.encoder.forward_blocks(images, (-2, -1))
        expected = backbone.necks["proposer"].pyramids[0]((blocks[0] + blocks[1]) / 2)
        maps = backbone(images)["proposer"].maps
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_register_tokens_are_dropped() -> None:
    config = {**HF_CONFIG, "model_type": "dinov2_with_registers", "num_register_tokens": 4}
    encoder = build_encoder(HF_CFG, config=config)
    assert encoder.num_prefix_tokens == 5
    assert encoder.forward_blocks(torch.randn(1, 3, 42, 56), (-1,))[0].shape == (1, 32, 3, 4)


@pytest.mark.parametrize("name", ["timm", "hf"])
def test_size_not_multiple_of_patch_raises(name: str) -> None:
    encoder = build_encoder(ENCODERS[name])
    with pytest.raises(ValueError, match=r"200x249 .* patch size 14"):
        encoder.forward_blocks(torch.randn(1, 3, 200, 249), (-1,))
    with pytest.raises(IndexError, match="block 2 out of range"):
        encoder.forward_blocks(torch.randn(1, 3, 56, 56), (2,))


def _rename_one_key(state: dict) -> dict:
    key = "blocks.0.attn.qkv.weight" if "blocks.0.attn.qkv.weight" in state else None
    key = key or next(k for k in state if "layer.0.attention" in k and k.endswith("weight"))
    state = dict(state)
    state[key.replace("0", "zero", 1)] = state.pop(key)
    return state


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], msg=key)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "dir"])
def test_timm_pretrained_loading(tmp_path: Path, fmt: str) -> None:
    source = build_encoder(TIMM_CFG)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = {"safetensors": tmp_path / "w.safetensors", "pth": tmp_path / "w.pth"}.get(fmt)
    if fmt == "pth":
        torch.save({"state_dict": state}, path)
    else:
        path = path or tmp_path / "model.safetensors"
        save_file(state, str(path))
    torch.manual_seed(1)
    loaded = MODELS.build({**TIMM_CFG, "pretrained": str(path if fmt != "dir" else tmp_path)})
    _assert_same_weights(source.model, loaded.model)

    save_file(_rename_one_key(state), str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.qkv\.weight.*blocks\.zero\.attn"):
        MODELS.build({**TIMM_CFG, "pretrained": str(tmp_path / "bad.safetensors")})
    MODELS.build({**TIMM_CFG, "pretrained": str(tmp_path / "bad.safetensors"), "strict": False})


def test_timm_pretrained_resamples_position_embedding(tmp_path: Path) -> None:
    source = build_encoder(TIMM_CFG)
    save_file(source.model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_encoder(TIMM_CFG, img_size=112, pretrained=str(tmp_path / "w.safetensors"))
    assert loaded.model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_encoder(TIMM_CFG, pretrained=str(tmp_path / "missing.safetensors"))


def test_hf_pretrained_loading(tmp_path: Path) -> None:
    source = build_encoder(HF_CFG)
    source.model.save_pretrained(tmp_path / "hf")
    loaded = build_encoder({"type": "HFDinov2Encoder"}, pretrained=str(tmp_path / "hf"))
    _assert_same_weights(source.model, loaded.model)
    assert loaded.training  # from_pretrained returns eval mode; the wrapper follows train()

    save_file(source.model.state_dict(), str(tmp_path / "w.safetensors"))
    from_file = build_encoder(HF_CFG, pretrained=str(tmp_path / "w.safetensors"))
    _assert_same_weights(source.model, from_file.model)

    bad = _rename_one_key(source.model.state_dict())
    save_file(bad, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(KeyError, match=r"encoder\.layer\.0\.attention"):
        build_encoder({"type": "HFDinov2Encoder"}, pretrained=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="config.json"):
        build_encoder(HF_CFG, pretrained=str(tmp_path / "hf"))


def test_mmengine_init_weights_keeps_encoder_weights() -> None:
    class Wrapper(BaseModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = build_encoder(TIMM_CFG)

    wrapper = Wrapper()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    wrapper.init_weights()
    _assert_same_weights_dict(before, wrapper.state_dict())


def _assert_same_weights_dict(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("name", ["timm", "hf"])
def test_frozen_encoder(name: str) -> None:
    backbone = build_backbone({**ENCODERS[name], "frozen": True})
    backbone.train()
    assert not backbone.encoder.training
    assert not any(m.training for m in backbone.encoder.modules())
    assert not any(p.requires_grad for p in backbone.encoder.parameters())
    pyramids = backbone(torch.randn(1, 3, 56, 42))
    sum(m.sum() for p in pyramids.values() for m in p.maps).backward()
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("necks.") for n, _ in trainable)
    assert all(p.grad is not None for _, p in trainable)


@pytest.mark.parametrize("name", ["timm", "hf"])
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    backbone = build_backbone(ENCODERS[name]).train()
    pyramids = backbone(torch.randn(2, 3, 56, 70))
    sum(m.sum() for p in pyramids.values() for m in p.maps).backward()
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing


def test_blocks_after_the_deepest_selected_one_are_not_trained() -> None:
    outputs = dict(proposer=dict(blocks=(0,), out_channels=8, scales=(1.0,)))
    backbone = build_backbone(TIMM_CFG, outputs)
    assert not any(p.requires_grad for p in backbone.encoder.model.blocks[1].parameters())
    assert all(p.requires_grad for p in backbone.encoder.model.blocks[0].parameters())


def test_simple_pyramid_odd_sizes_and_validation() -> None:
    pyramid = SimpleFeaturePyramid(in_channels=32, out_channels=8)
    maps = pyramid(torch.randn(1, 32, 7, 9))
    assert [tuple(m.shape) for m in maps] == [
        (1, 8, 28, 36),
        (1, 8, 14, 18),
        (1, 8, 7, 9),
        (1, 8, 4, 5),
    ]
    with pytest.raises(ValueError, match="finest first"):
        SimpleFeaturePyramid(in_channels=32, out_channels=8, scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="not in"):
        SimpleFeaturePyramid(in_channels=32, out_channels=8, scales=(3.0,))


def test_backbone_config_errors() -> None:
    with pytest.raises(ValueError, match="one scale per block"):
        build_backbone(TIMM_CFG, dict(r=dict(blocks=(-1,), fuse="levels", out_channels=8)))
    with pytest.raises(ValueError, match="fuse 'max'"):
        build_backbone(TIMM_CFG, dict(r=dict(blocks=(-1,), fuse="max", out_channels=8)))
    with pytest.raises(KeyError, match="no output 'llm'"):
        build_backbone(TIMM_CFG).out_channels("llm")


@pytest.mark.parametrize("name", ["timm", "hf"])
def test_paper_scale_builds_on_meta_device(name: str) -> None:
    encoder = {
        "timm": dict(type="TimmViTEncoder", model_name="vit_large_patch14_dinov2", img_size=448),
        "hf": dict(
            type="HFDinov2Encoder",
            config=dict(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                patch_size=14,
                image_size=518,
            ),
        ),
    }[name]
    outputs = dict(
        proposer=dict(blocks=(-4, -3, -2, -1), fuse="mean", out_channels=256),
        region_encoder=dict(
            blocks=(-3, -2, -1), fuse="levels", scales=(4.0, 2.0, 1.0), out_channels=1024
        ),
    )
    with torch.device("meta"):
        backbone = build_backbone({**encoder, "frozen": True}, outputs)
    assert backbone.encoder.embed_dim == 1024 and backbone.encoder.num_blocks == 24
    assert all(p.is_meta for p in backbone.parameters())
