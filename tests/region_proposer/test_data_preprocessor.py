"""Tests for ``ProposerDataPreprocessor``: normalise, pad to the patch grid, record sizes."""

from __future__ import annotations

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.structures import BaseDataElement

from region_proposer.pretrain.data_preprocessor import ProposerDataPreprocessor
from region_proposer.registry import MODELS

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def make_batch(*shapes: tuple[int, ...]) -> dict:
    generator = torch.Generator().manual_seed(0)
    items = [
        dict(
            inputs=torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
            data_samples=BaseDataElement(metainfo=dict(sample_id=str(i))),
        )
        for i, shape in enumerate(shapes)
    ]
    return pseudo_collate(items)


def test_pads_odd_and_non_square_sizes() -> None:
    preprocessor = MODELS.build(dict(type="ProposerDataPreprocessor", pad_size_divisor=14))
    batch = make_batch((3, 200, 250), (3, 200, 249), (3, 10, 10))
    images = [image.clone() for image in batch["inputs"]]
    out = preprocessor(batch)
    inputs, samples = out["inputs"], out["data_samples"]
    assert inputs.shape == (3, 3, 210, 252) and inputs.dtype == torch.float32
    assert out["valid_sizes"].tolist() == [[200, 250], [200, 249], [10, 10]]
    assert out["valid_sizes"].dtype == torch.long
    for i, (image, sample) in enumerate(zip(images, samples, strict=True)):
        h, w = image.shape[-2:]
        torch.testing.assert_close(inputs[i, :, :h, :w], (image.float() - MEAN) / STD)
        # Padding happens after normalisation: padded pixels hold pad_value (0 = mean colour).
        assert inputs[i, :, h:].abs().sum() == 0 and inputs[i, :, :, w:].abs().sum() == 0
        assert sample.batch_input_shape == (210, 252)
        assert sample.valid_size == (h, w)
        assert sample.sample_id == str(i)


def test_image_smaller_than_a_patch_is_padded_to_one_patch() -> None:
    preprocessor = ProposerDataPreprocessor(pad_size_divisor=14, pad_value=-1.0)
    out = preprocessor(make_batch((3, 10, 10)))
    assert out["inputs"].shape == (1, 3, 14, 14)
    assert out["valid_sizes"].tolist() == [[10, 10]]
    assert (out["inputs"][0, :, 10:] == -1.0).all()


def test_exact_multiple_is_not_padded() -> None:
    out = ProposerDataPreprocessor(pad_size_divisor=14)(make_batch((3, 28, 42)))
    assert out["inputs"].shape == (1, 3, 28, 42)


def test_grayscale_is_repeated_and_other_channel_counts_are_rejected() -> None:
    preprocessor = ProposerDataPreprocessor()
    batch = make_batch((1, 20, 30))
    gray = batch["inputs"][0].float()
    out = preprocessor(batch)
    assert out["inputs"].shape == (1, 3, 28, 42)
    torch.testing.assert_close(out["inputs"][0, :, :20, :30], (gray - MEAN) / STD)
    with pytest.raises(ValueError, match=r"image 1 has shape \(4, 20, 30\).*C = 3"):
        preprocessor(make_batch((3, 20, 30), (4, 20, 30)))
    with pytest.raises(ValueError, match="empty batch"):
        preprocessor(dict(inputs=[], data_samples=[]))


def test_stacked_inputs_bgr_and_no_samples() -> None:
    preprocessor = ProposerDataPreprocessor(pad_size_divisor=16, bgr_to_rgb=True)
    image = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    out = preprocessor(dict(inputs=image, data_samples=None))
    assert out["data_samples"] is None and out["inputs"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(out["inputs"][:, :, :20, :20], (image.flip(1).float() - MEAN) / STD)


def test_cast_data_follows_the_module_device() -> None:
    preprocessor = ProposerDataPreprocessor().to("meta")
    assert preprocessor.device == torch.device("meta") and preprocessor.mean.is_meta
    out = preprocessor(make_batch((3, 14, 20)))
    assert out["inputs"].is_meta and out["valid_sizes"].is_meta
    assert out["data_samples"][0].valid_size == (14, 20)
