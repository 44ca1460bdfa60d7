"""FeaturePyramid and Proposals: construction checks name the offending field."""

import pytest
import torch

from region_proposer.structures import FeaturePyramid, Proposals


def _maps(batch=2, sizes=((56, 64), (28, 32), (14, 16))):
    return [torch.randn(batch, 8, h, w) for h, w in sizes]


def test_pyramid_strides_derived_from_shapes():
    pyr = FeaturePyramid.from_maps(_maps(), image_size=(224, 256))
    assert pyr.strides == (4.0, 8.0, 16.0)
    assert pyr.batch_size == 2 and pyr.channels == (8, 8, 8)


def test_pyramid_odd_size_with_ceil_levels():
    # 249 px with stride-14 patches: 18 cells (ceil) is within one cell of 249 / 14.
    maps = [torch.randn(1, 4, 18, 15)]
    pyr = FeaturePyramid.from_maps(maps, image_size=(249, 200))
    assert pyr.strides[0] == pytest.approx(249 / 18)


def test_pyramid_rejects_wrong_stride_naming_field():
    with pytest.raises(ValueError, match=r"FeaturePyramid.strides\[1\]"):
        FeaturePyramid(maps=tuple(_maps()), strides=(4.0, 4.0, 16.0), image_size=(224, 256))


def test_pyramid_rejects_batch_mismatch_and_rank():
    maps = _maps()
    maps[2] = torch.randn(3, 8, 14, 16)
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        FeaturePyramid.from_maps(maps, image_size=(224, 256))
    with pytest.raises(ValueError, match=r"maps\[0\] must have 4 dims"):
        FeaturePyramid.from_maps([torch.randn(8, 56, 64)], image_size=(224, 256))
    with pytest.raises(TypeError, match="floating point"):
        FeaturePyramid.from_maps(
            [torch.zeros(1, 8, 56, 64, dtype=torch.long)], image_size=(224, 256)
        )


def test_pyramid_valid_sizes_checked():
    maps = _maps()
    ok = FeaturePyramid.from_maps(
        maps, (224, 256), valid_sizes=torch.tensor([[224, 200], [100, 256]])
    )
    assert ok.valid_sizes is not None
    with pytest.raises(ValueError, match="valid_sizes"):
        FeaturePyramid.from_maps(maps, (224, 256), valid_sizes=torch.tensor([[225, 200], [1, 1]]))
    with pytest.raises(ValueError, match="valid_sizes has 1 rows"):
        FeaturePyramid.from_maps(maps, (224, 256), valid_sizes=torch.tensor([[224, 256]]))


def test_pyramid_is_frozen():
    pyr = FeaturePyramid.from_maps(_maps(), image_size=(224, 256))
    with pytest.raises(AttributeError):
        pyr.strides = (1.0,)


def test_proposals_shapes_and_errors():
    p = Proposals(
        boxes=torch.rand(2, 5, 4),
        scores=torch.rand(2, 5),
        valid=torch.ones(2, 5, dtype=torch.bool),
        embeddings=torch.randn(2, 5, 16),
    )
    assert p.batch_size == 2 and p.num_proposals == 5
    with pytest.raises(ValueError, match=r"Proposals.scores has leading dims \(2, 4\)"):
        Proposals(
            boxes=torch.rand(2, 5, 4),
            scores=torch.rand(2, 4),
            valid=torch.ones(2, 5, dtype=torch.bool),
        )
    with pytest.raises(TypeError, match=r"Proposals.valid must have dtype"):
        Proposals(boxes=torch.rand(2, 5, 4), scores=torch.rand(2, 5), valid=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"Proposals.boxes must have last dim 4"):
        Proposals(
            boxes=torch.rand(2, 5, 5),
            scores=torch.rand(2, 5),
            valid=torch.ones(2, 5, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match=r"Proposals.embeddings has leading dims"):
        Proposals(
            boxes=torch.rand(2, 5, 4),
            scores=torch.rand(2, 5),
            valid=torch.ones(2, 5, dtype=torch.bool),
            embeddings=torch.randn(2, 6, 16),
        )


def test_proposals_empty():
    p = Proposals.empty(3)
    assert p.boxes.shape == (3, 0, 4) and p.valid.dtype == torch.bool
