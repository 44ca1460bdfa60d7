"""``DescribeHead``: text logits biased towards the words that describe the regions a user cites."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class DescribeHead(nn.Module):
    """Adds to the text logits at position t ``g(h_t) * sum_u a_tu * (w_v . r_u)``: the match
    between each vocabulary token v and the user regions u the prompt cites, weighted by an
    attention ``a_tu = softmax_u(q(h_t) . r_u)`` and a learned gate ``g(h_t)``.

    The word keys ``w_v`` and region keys ``r_u`` are the region pointer's own (``phrase_query``
    of the token's embedding, ``feature_key`` of the region token), the space the region-text
    alignment loss trains, so "star" scores high for a region that looks like a star. It is the
    pointer run backwards (region -> words), as the copy head is a pointer into the prompt: a
    from-scratch LLM that has not learnt to read a region feature into words can still name
    what a box, point or mask prompt shows.

    Args:
        hidden_size: The LLM's hidden size D.
        dim: Width of the pointer's keys (``RegionPointerHead`` ``dim``).
    """

    def __init__(self, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, dim)
        self.gate = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # starts as the identity on the logits
        self.scale = 1.0 / math.sqrt(dim)

    def match(self, region_keys: Tensor, word_keys: Tensor) -> Tensor:
        """(B, U, V0) score of each text token for each user region (computed once per prompt
        while decoding).

        Args:
            region_keys: (B, U, d) keys of each sample's user regions.
            word_keys: (V0, d) key of each text token.
        """
        return torch.einsum("bud,vd->buv", region_keys, word_keys) * self.scale

    def forward(
        self, logits: Tensor, hidden: Tensor, region_keys: Tensor, match: Tensor, valid: Tensor
    ) -> Tensor:
        """Biased logits.

        Args:
            logits: (B, L, V) logits; columns ``[0, V0)`` are the text tokens ``match`` scores,
                the others are left as they are.
            hidden: (B, L, D) hidden states predicting the next token.
            region_keys: (B, U, d) keys of each sample's user regions.
            match: (B, U, V0) from :meth:`match`.
            valid: (B, U) bool; a sample without a valid user region keeps its logits.

        Returns:
            (B, L, V) logits.
        """
        if region_keys.shape[1] == 0:
            if not torch.is_grad_enabled():  # decoding: nothing to add
                return logits
            # parameters stay in the graph (data-parallel sync)
            return logits + sum(p.sum() for p in self.parameters()).to(logits.dtype) * 0.0
        attend = torch.einsum("bld,bud->blu", self.query(hidden), region_keys) * self.scale
        low = torch.finfo(attend.dtype).min
        weights = attend.masked_fill(~valid[:, None, :], low).softmax(-1)
        weights = weights * valid[:, None, :].any(-1, keepdim=True).to(weights.dtype)
        bias = self.gate(hidden) * torch.einsum("blu,buv->blv", weights, match)
        num_words = match.shape[-1]
        return torch.cat(
            [logits[..., :num_words] + bias.to(logits.dtype), logits[..., num_words:]], -1
        )
