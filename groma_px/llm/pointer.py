"""``RegionPointerHead``: logits of ``<ri>`` as the match between a hidden state and region i."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Logit of a region token whose region does not exist in the sample (never chosen, no NaN).
MASKED_LOGIT = -1.0e4


class RegionPointerHead(nn.Module):
    """Scores region i for the next token by ``q(h_t) . (k(h_slot_i) + k_f(f_i)) / sqrt(d)``,
    where ``h_slot_i`` is the LLM's last hidden state at the prompt position that carries region
    i's feature (the ``<region>`` slot in the pair layout, ``<ri>`` in the fused one) and ``f_i``
    the region token itself: a pointer network (Vinyals et al., 2015) over the region set. The
    direct feature key lets the answer's phrase be matched against what the region encoder saw
    without first routing it through every LLM layer. Replaces the linear ``new_head`` rows of
    ``<r0>``... ``<r{K-1}>`` when ``GromaPX(region_head="pointer")``; text logits are unchanged.

    Args:
        hidden_size: The LLM's hidden size D.
        dim: Width of queries and keys; defaults to D.
    """

    def __init__(self, hidden_size: int, dim: int | None = None) -> None:
        super().__init__()
        dim = dim or hidden_size
        self.query = nn.Linear(hidden_size, dim)
        self.key = nn.Linear(hidden_size, dim)
        self.feature_key = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(
        self, hidden: Tensor, slot_hidden: Tensor, slot_feats: Tensor, slot_valid: Tensor
    ) -> Tensor:
        """Pointer logits.

        Args:
            hidden: (B, L, D) hidden states that predict the next token.
            slot_hidden: (B, K, D) hidden states at each region's slot.
            slot_feats: (B, K, D) region tokens (as spliced into the prompt).
            slot_valid: (B, K) bool; False for regions a sample does not have.

        Returns:
            (B, L, K) logits; ``MASKED_LOGIT`` where ``slot_valid`` is False.
        """
        keys = self.key(slot_hidden) + self.feature_key(slot_feats)
        scores = torch.einsum("bld,bkd->blk", self.query(hidden), keys) * self.scale
        return scores.masked_fill(~slot_valid[:, None, :], MASKED_LOGIT)


def slot_positions(region_slots: Tensor, num_regions: list[int]) -> tuple[Tensor, Tensor]:
    """Position of each region's first feature slot.

    Args:
        region_slots: (B, L) long region row per position, -1 for none (``collate_sequences``).
        num_regions: K_b per sample.

    Returns:
        ``(positions (B, K_max) long, valid (B, K_max) bool)``; invalid entries hold 0.
    """
    batch, length = region_slots.shape
    k_max = max(num_regions + [0])
    positions = torch.zeros(batch, k_max, dtype=torch.long, device=region_slots.device)
    valid = torch.zeros(batch, k_max, dtype=torch.bool, device=region_slots.device)
    if k_max == 0:
        return positions, valid
    rows = torch.arange(k_max, device=region_slots.device)
    matches = region_slots[:, None, :] == rows[None, :, None]  # (B, K, L)
    found = matches.any(-1)
    first = torch.argmax(matches.int(), dim=-1)  # first True along L
    positions = torch.where(found, first, positions)
    return positions, found


def pointer_logits(
    pointer: RegionPointerHead,
    logits: Tensor,
    hidden: Tensor,
    batch: dict,
    region_cols: Tensor,
    *,
    prefill: Tensor | None = None,
) -> Tensor:
    """``logits`` with the ``<ri>`` columns replaced by pointer scores (absent regions masked).

    Args:
        pointer: The head.
        logits: (B, L', V) logits of the positions in ``hidden``.
        hidden: (B, L', D) hidden states predicting the next token.
        batch: The collated prompt: ``region_slots`` (B, L), ``num_regions`` (list of K_b),
            ``region_feats`` (sum K_b, D).
        region_cols: (K,) ids of ``<r0>`` ... ``<r{K-1}>`` (columns of ``logits``).
        prefill: (B, L, D) hidden states of the whole prompt when ``hidden`` holds only
            decoding steps; defaults to ``hidden``.
    """
    source = hidden if prefill is None else prefill
    positions, valid = slot_positions(batch["region_slots"], batch["num_regions"])
    keys = source.gather(1, positions[..., None].expand(-1, -1, source.shape[-1]))
    feats = padded_rows(batch["region_feats"], batch["num_regions"], positions.shape[1])
    scores = pointer(hidden, keys, feats, valid).to(logits.dtype)  # (B, L', K_max)
    out = logits.clone()
    out[..., region_cols] = MASKED_LOGIT
    out[..., region_cols[: scores.shape[-1]]] = scores
    return out


def padded_rows(rows: Tensor, counts: list[int], width: int) -> Tensor:
    """(sum K_b, D) rows, sample after sample -> (B, width, D), zero-padded."""
    out = rows.new_zeros(len(counts), width, rows.shape[-1])
    start = 0
    for b, k in enumerate(counts):
        out[b, :k] = rows[start : start + k]
        start += k
    return out
