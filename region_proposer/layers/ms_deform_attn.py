"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR) in pure PyTorch.

The sampling is :func:`torch.nn.functional.grid_sample` (bilinear, zero padding,
``align_corners=False``), so a location ``(x, y)`` in [0, 1] is a fraction of a level's width and
height measured from its outer edges: cell ``j`` has its centre at ``(j + 0.5) / W``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "multi_scale_deformable_attention", "spatial_shapes_list"]


def spatial_shapes_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(H_l, W_l) per level as Python ints (a tensor is read back once, a sync on GPU)."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


# Single-threaded CPU runs take the queries in chunks whose output (B * M * D * chunk floats,
# 1 MiB) stays in cache across the L * P accumulations into it: about 2x faster for 448-896 px
# pyramids. With several threads every op is a parallel region, and when other processes compete
# for the cores each region can wait a time slice: a thousand small regions were 4x slower than
# one pass (benchmarks/bench_proposer.py, 2 shared cores), so those runs, and GPUs, take all
# queries at once.
_CPU_CHUNK_ELEMENTS = 2**18


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    query_chunk: int | None = None,
) -> Tensor:
    """Attention-weighted sum of bilinearly sampled values over levels and points.

    Args:
        value: (B, S, M, D) per-head values of the flattened levels, S = sum_l H_l * W_l,
            level-major, each level row-major.
        spatial_shapes: (L, 2) long (H_l, W_l) per level, or the same as Python ints.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) in [0, 1] of each level;
            locations outside read zeros.
        attention_weights: (B, Q, M, L, P) weights (softmax-normalised over L * P by callers).
        query_chunk: Queries per chunk, 0 for all at once. Defaults to None: 1 MiB of output
            per chunk on a single-threaded CPU, all at once otherwise (see the comment above).

    Returns:
        (B, Q, M * D) attended values, heads concatenated.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    batch, num_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != num_tokens or len(shapes) != num_levels:
        raise ValueError(
            f"spatial_shapes {shapes} describe {sum(sizes)} tokens in {len(shapes)} levels; value "
            f"has {num_tokens} tokens and sampling_locations {num_levels} levels"
        )
    # Queries go last so that the weighted sums below run along contiguous memory:
    # (B, Q, M, L, P, 2) -> (L, B*M, P, Q, 2), and (B, Q, M, L, P) -> (L, P, B*M, 1, Q).
    grids = sampling_locations.permute(3, 0, 2, 4, 1, 5).mul(2.0).sub_(1.0)  # grid_sample: [-1, 1]
    grids = grids.reshape(num_levels, batch * num_heads, num_points, num_queries, 2).to(value)
    weights = attention_weights.permute(3, 4, 0, 2, 1)
    weights = weights.reshape(num_levels, num_points, batch * num_heads, 1, num_queries).to(value)
    # (B, H*W, M, D) -> (B*M, D, H, W) per level
    level_values = [
        level_value.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        for level_value, (height, width) in zip(value.split(sizes, dim=1), shapes, strict=True)
    ]
    if query_chunk is None:
        single_thread_cpu = value.device.type == "cpu" and torch.get_num_threads() == 1
        query_chunk = (
            _CPU_CHUNK_ELEMENTS // (batch * num_heads * head_dim) if single_thread_cpu else 0
        )
    chunks = []
    for start, end in _chunk_bounds(num_queries, query_chunk):
        chunk = _attend_chunk(level_values, grids[..., start:end, :], weights[..., start:end])
        # (B*M, D, Qc) -> (B, Qc, M*D), made contiguous while the chunk is still in cache
        chunk = chunk.view(batch, num_heads * head_dim, end - start).transpose(1, 2)
        chunks.append(chunk.contiguous())
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def _chunk_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most ``chunk`` (all of ``total`` when chunk <= 0)."""
    step = total if chunk <= 0 else max(1, chunk)
    return [(start, min(total, start + step)) for start in range(0, max(total, 1), step)]


def _attend_chunk(level_values: list[Tensor], grids: Tensor, weights: Tensor) -> Tensor:
    """Weighted samples of one chunk of Qc queries.

    Args:
        level_values: Per level (B*M, D, H_l, W_l) values.
        grids: (L, B*M, P, Qc, 2) sampling grids in [-1, 1].
        weights: (L, P, B*M, 1, Qc) attention weights.

    Returns:
        (B*M, D, Qc) attended values.
    """
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (grids, weights, *level_values)
    )
    first = level_values[0]
    output = None if differentiable else first.new_zeros(*first.shape[:2], grids.shape[-2])
    for level, level_value in enumerate(level_values):
        sampled = F.grid_sample(
            level_value, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*M, D, P, Qc)
        if differentiable:
            # One product and sum per level: the per-point form below would make backward
            # allocate and zero a gradient the size of ``sampled`` for every point
            # (select_backward), 40 ms of a 0.65 s stage-1 step.
            term = (sampled * weights[level].permute(1, 2, 0, 3)).sum(2)
            output = term if output is None else output + term
            continue
        # One fused multiply-add per point into the output: no stacked or weighted copy of the
        # samples (the transformers reference stacks all levels, multiplies, then sums).
        for point in range(sampled.shape[2]):
            output.addcmul_(sampled[:, :, point], weights[level, point])
    return output


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query attends to a few points per head and level.

    Sampling offsets and attention weights are linear in the query; the reference point is a
    point (x, y) or a box (cx, cy, w, h). Offsets of a point are in cells of each level, offsets
    of a box in fractions of half its size divided by ``num_points`` (as in the paper).

    Args:
        embed_dim: Width D of queries and values. Defaults to 256.
        num_heads: Attention heads M; ``embed_dim`` must divide evenly. Defaults to 8.
        num_levels: Feature levels L. Defaults to 4.
        num_points: Sampling points P per head and level. Defaults to 4.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR initialisation.

        Offsets start as a ring: head ``m`` looks in direction ``2 * pi * m / M`` (scaled so the
        larger of |dx|, |dy| is 1), point ``p`` at ``p + 1`` cells along it; attention starts
        uniform over levels and points; value and output projections are Xavier.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        ring = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        ring = ring / ring.abs().amax(dim=-1, keepdim=True)
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        # (M, 2) x (P,) -> (M, L, P, 2)
        grid = ring[:, None, None, :] * steps[None, None, :, None]
        grid = grid.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attends from queries to the flattened multi-scale values.

        Args:
            query: (B, Q, D) queries, position embedding already added.
            reference_points: (B, Q, L, 2) points (x, y) or (B, Q, L, 4) boxes (cx, cy, w, h),
                normalised to each level's full (padded) extent, see the module docstring.
            value: (B, S, D) flattened levels (level-major, row-major).
            spatial_shapes: (H_l, W_l) per level.
            key_padding_mask: (B, S) bool, True at padded cells, whose values are zeroed.
                Defaults to None (no padding).

        Returns:
            (B, Q, D) attended features.
        """
        value = self._project_value(value, key_padding_mask)
        offsets, weights = self._offsets_and_weights(query)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        attended = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(attended)

    def _project_value(self, value: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """(B, S, D) -> (B, S, M, D / M), zero at padded cells."""
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        batch, num_tokens, _ = value.shape
        return value.view(batch, num_tokens, self.num_heads, self.embed_dim // self.num_heads)

    def _offsets_and_weights(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets (B, Q, M, L, P, 2) and softmax weights (B, Q, M, L, P) from the queries."""
        batch, num_queries, _ = query.shape
        shape = (batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        logits = self.attention_weights(query).view(batch, num_queries, self.num_heads, -1)
        return offsets, logits.softmax(dim=-1).view(shape)

    def _sampling_locations(
        self, reference_points: Tensor, offsets: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Reference (B, Q, L, 2|4) + offsets (B, Q, M, L, P, 2) -> locations, same shape."""
        coords = reference_points.shape[-1]
        if reference_points.shape[-2] != self.num_levels or coords not in (2, 4):
            raise ValueError(
                f"reference_points must be (B, Q, {self.num_levels}, 2 or 4), got "
                f"{tuple(reference_points.shape)}"
            )
        ref = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
        if coords == 2:
            # offsets are in cells: divide by (W_l, H_l)
            cells = torch.tensor(
                [(w, h) for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
            )
            return ref + offsets / cells[None, None, None, :, None, :]
        return ref[..., :2] + offsets * (0.5 / self.num_points) * ref[..., 2:]
