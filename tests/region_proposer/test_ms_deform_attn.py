"""Multi-scale deformable attention: parity with the transformers reference (values and grads)."""

import math

import pytest
import torch
from transformers import DeformableDetrConfig
from transformers.models.deformable_detr import modeling_deformable_detr as hf

from region_proposer.layers import MSDeformAttn, multi_scale_deformable_attention

SHAPES = [(12, 9), (6, 5), (3, 3)]  # several levels, non-square, odd


def _inputs(batch=2, heads=4, dim=8, queries=7, points=3, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, generator=gen, dtype=torch.float64)
    # a margin outside [0, 1] exercises the zero padding
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, loc.double(), weights.double()


def _reference(value, shapes, loc, weights):
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return hf.MultiScaleDeformableAttention()(value, spatial, shapes, start, loc, weights, 64)


@pytest.mark.parametrize("chunk", [None, 0, 3, 100])
def test_values_match_transformers_reference(chunk):
    value, loc, weights = _inputs()
    ours = multi_scale_deformable_attention(
        value, torch.tensor(SHAPES), loc, weights, query_chunk=chunk
    )
    ref = _reference(value, SHAPES, loc, weights)
    assert ours.shape == (2, 7, 4 * 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_gradients_match_transformers_reference(chunk):
    grads = []
    for fn in (
        lambda v, loc, w: multi_scale_deformable_attention(v, SHAPES, loc, w, query_chunk=chunk),
        lambda v, loc, w: _reference(v, SHAPES, loc, w),
    ):
        value, loc, weights = (t.clone().requires_grad_() for t in _inputs(seed=1))
        out = fn(value, loc, weights)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([value.grad, loc.grad, weights.grad])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_differentiable_and_inference_paths_agree(chunk):
    """With gradients the levels are summed as products (no per-point in-place adds, whose
    backward zero-fills a sample-sized gradient per point); without, in place. Same values."""
    value, loc, weights = (t.float() for t in _inputs(seed=3))
    with torch.no_grad():
        inference = multi_scale_deformable_attention(value, SHAPES, loc, weights, chunk)
    trained = multi_scale_deformable_attention(
        value.requires_grad_(), SHAPES, loc, weights, query_chunk=chunk
    )
    assert trained.requires_grad and not inference.requires_grad
    torch.testing.assert_close(trained, inference, atol=1e-6, rtol=1e-5)


def test_float32_within_tolerance_and_shape_check():
    value, loc, weights = (t.float() for t in _inputs(batch=1, seed=2))
    ours = multi_scale_deformable_attention(value, SHAPES, loc, weights)
    torch.testing.assert_close(ours, _reference(value, SHAPES, loc, weights), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, SHAPES[:2], loc, weights)


def _hf_module(embed_dim, heads, levels, points):
    config = DeformableDetrConfig(d_model=embed_dim, num_feature_levels=levels)
    return hf.DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=points)


@pytest.mark.parametrize("coords", [2, 4])
def test_module_matches_transformers_module_with_padding(coords):
    torch.manual_seed(0)
    embed_dim, heads, points, batch, queries = 32, 4, 2, 2, 5
    ours = MSDeformAttn(embed_dim=embed_dim, num_heads=heads, num_levels=3, num_points=points)
    ref = _hf_module(embed_dim, heads, 3, points)
    with torch.no_grad():  # random offsets/weights so that the test sees more than the init
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    tokens = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(batch, queries, embed_dim), torch.randn(batch, tokens, embed_dim)
    refs = torch.rand(batch, queries, 3, coords) * 0.8 + 0.1
    pad = torch.rand(batch, tokens) < 0.3
    out = ours(query, refs, value, SHAPES, key_padding_mask=pad)
    expected, _ = ref(
        query,
        attention_mask=~pad,
        encoder_hidden_states=value,
        reference_points=refs,
        spatial_shapes=torch.tensor(SHAPES),
        spatial_shapes_list=SHAPES,
        level_start_index=None,
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_init_is_a_ring_of_directions_with_uniform_weights():
    attn = MSDeformAttn(embed_dim=32, num_heads=8, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.detach().view(8, 2, 3, 2)
    assert torch.all(bias[:, 0] == bias[:, 1])  # same ring on every level
    head = 1  # 45 degrees: (1, 1) after scaling the larger coordinate to 1, times point index
    torch.testing.assert_close(bias[head, 0], torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert math.isclose(float(bias[2, 0, 0, 0]), 0.0, abs_tol=1e-6)  # 90 degrees: (0, 1)
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = [(2, 2), (1, 1)]
    out = attn(torch.randn(1, 3, 32), torch.rand(1, 3, 2, 2), torch.randn(1, 5, 32), shapes)
    assert out.shape == (1, 3, 32)


def test_masked_values_do_not_contribute():
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=1, num_points=2)
    query, refs = torch.randn(1, 4, 16), torch.rand(1, 4, 1, 2)
    value = torch.randn(1, 16, 16)
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[:, 8:] = True
    changed = value.clone()
    changed[:, 8:] = 1e3
    out_a = attn(query, refs, value, [(4, 4)], key_padding_mask=pad)
    out_b = attn(query, refs, changed, [(4, 4)], key_padding_mask=pad)
    torch.testing.assert_close(out_a, out_b)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    value, loc, weights = (t.float() for t in _inputs(seed=3))
    cpu = multi_scale_deformable_attention(value, SHAPES, loc, weights)
    cuda = multi_scale_deformable_attention(value.cuda(), SHAPES, loc.cuda(), weights.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
