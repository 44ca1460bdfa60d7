"""``CopyHead``: lets the answer copy text tokens from the prompt (pointer-generator style).

A grounded answer usually repeats words of the question: "Find the blue star." ->
``<p>the blue star</p><roi><r3></roi>``, and the region pointer reads the phrase the answer
wrote. A small LLM trained from scratch on a CPU budget learns to copy slowly (it needs an
induction-head circuit), so it writes "the red star" and then points at a red star. The copy head
is that circuit written down: position t (current token ``x_t``, hidden ``h_t``) attends over the
prompt's text positions s, keyed by ``(h_s, x_{s-1})``, and the attention mass at s votes for the
token ``x_s`` — "what followed the current token in the prompt comes next".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .sequence import IGNORE_INDEX


class CopyHead(nn.Module):
    """Copy scores ``q(h_t, e(x_t)) . k(h_s, e(x_{s-1})) / sqrt(d)`` of source positions s.

    The output distribution is one softmax over the LLM's logits and the copy scores of every
    source position, each source's mass going to the token it holds (See et al., 2017, with the
    gate folded into the shared softmax): ``final[v] = log(exp(logits[v]) + sum_{s: x_s = v}
    exp(score_s))``. Tokens not in the prompt keep their logits exactly, so the head can only add
    probability to what the prompt says.

    Args:
        hidden_size: The LLM's hidden size D (also the token-embedding width).
        dim: Width of queries and keys. Defaults to D // 2.
    """

    def __init__(self, hidden_size: int, dim: int | None = None) -> None:
        super().__init__()
        dim = dim or max(1, hidden_size // 2)
        self.query = nn.Sequential(nn.LayerNorm(2 * hidden_size), nn.Linear(2 * hidden_size, dim))
        self.key = nn.Sequential(nn.LayerNorm(2 * hidden_size), nn.Linear(2 * hidden_size, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def keys(self, source_hidden: Tensor, source_previous: Tensor) -> Tensor:
        """(B, S, d) keys of source positions from their hidden states (B, S, D) and the
        embeddings of the tokens before them (B, S, D)."""
        return self.key(torch.cat([source_hidden, source_previous], dim=-1))

    def forward(
        self,
        logits: Tensor,
        hidden: Tensor,
        current: Tensor,
        keys: Tensor,
        source_ids: Tensor,
        source_mask: Tensor,
    ) -> Tensor:
        """Logits mixed with copy scores.

        Args:
            logits: (N, L', V) next-token logits at the query positions.
            hidden: (N, L', D) hidden states at the query positions.
            current: (N, L', D) embeddings of the tokens at the query positions (``x_t``).
            keys: (N, S, d) source keys (:meth:`keys`).
            source_ids: (N, S) long token each source holds (``x_s``), ids in ``[0, V)``.
            source_mask: (N, L', S) or (N, 1, S) bool: which sources each query may copy.

        Returns:
            (N, L', V) ``final`` as above, in ``logits``' dtype.
        """
        query = self.query(torch.cat([hidden, current], dim=-1))
        scores = torch.einsum("bld,bsd->bls", query, keys).float() * self.scale
        scores = scores.masked_fill(~source_mask, float("-inf"))
        # log sum_{s: x_s = v} exp(score_s), stabilised by the row max.
        top = scores.amax(-1, keepdim=True).clamp(min=-1e4).detach()  # rows with no source
        mass = scores.new_zeros(*scores.shape[:2], logits.shape[-1])
        index = source_ids[:, None, :].expand(-1, scores.shape[1], -1)
        mass = mass.scatter_add(-1, index, torch.exp(scores - top))
        # Tokens not in the sources keep their logits exactly (e.g. masked region columns);
        # log(1) stands in for their log(0), whose gradient would be NaN.
        present = mass > 0
        copy = torch.log(torch.where(present, mass, torch.ones_like(mass))) + top
        mixed = torch.where(present, torch.logaddexp(logits.float(), copy), logits.float())
        return mixed.to(logits.dtype)

    def decoding_plan(self, keys: Tensor, source_ids: Tensor, source_mask: Tensor) -> CopyPlan:
        """What :meth:`decode_step` needs of a batch's prompt, computed once per batch.

        Args:
            keys: (B, S, d) sources' keys (:meth:`keys`).
            source_ids: (B, S) long token each source holds.
            source_mask: (B, S) bool: the sources every step may copy.
        """
        batch = source_ids.shape[0]
        distinct = [source_ids[b][source_mask[b]].unique() for b in range(batch)]
        width = max([len(d) for d in distinct] + [1])
        tokens = source_ids.new_zeros(batch, width)
        for b, d in enumerate(distinct):
            if len(d):  # padding repeats the first token: same mass, same mixed value
                tokens[b] = torch.cat([d, d[:1].expand(width - len(d))])
        member = (source_ids[:, :, None] == tokens[:, None, :]) & source_mask[:, :, None]
        bias = torch.where(source_mask, 0.0, float("-inf"))
        return CopyPlan(
            keys=(keys.float() * self.scale).transpose(1, 2).contiguous(),
            bias=bias[:, None, :],
            tokens=tokens,
            member=member.float(),
        )

    def decode_step(
        self, logits: Tensor, hidden: Tensor, current: Tensor, plan: CopyPlan
    ) -> Tensor:
        """:meth:`forward` for one query position per row, from a :meth:`decoding_plan`: the
        scores' mass is summed per distinct source token (a (B, S) x (B, S, U) product) and
        only those U columns of the (B, V) logits are mixed, so the step costs a few small
        operators, none over the vocabulary but a gather and a scatter.

        Args:
            logits: (B, V) next-token logits.
            hidden: (B, D) hidden states.
            current: (B, D) embeddings of the current tokens.
            plan: From :meth:`decoding_plan` for this batch.

        Returns:
            (B, V) as :meth:`forward` (up to the order of the sums), in ``logits``' dtype.
        """
        query = self.query(torch.cat([hidden, current], dim=-1)).float()
        scores = torch.baddbmm(plan.bias, query[:, None], plan.keys)  # (B, 1, S)
        top = scores.amax(-1, keepdim=True).clamp_(min=-1e4)
        copy = torch.bmm(torch.exp(scores - top), plan.member).log_().add_(top)[:, 0]
        mixed = torch.logaddexp(logits.gather(1, plan.tokens).float(), copy)
        return logits.scatter(1, plan.tokens, mixed.to(logits.dtype))


class CopyPlan(NamedTuple):
    """A batch's prompt as :meth:`CopyHead.decode_step` reads it.

    Attributes:
        keys: (B, d, S) float source keys times the head's scale, transposed.
        bias: (B, 1, S) 0 at the sources a step may copy, -inf elsewhere.
        tokens: (B, U) long distinct tokens of each row's sources, padded by repeating the first
            (0 for a row with none).
        member: (B, S, U) float: 1 where source s may be copied and holds ``tokens[:, u]``.
    """

    keys: Tensor
    bias: Tensor
    tokens: Tensor
    member: Tensor


def copy_sources(batch: dict[str, Tensor], first_new_id: int) -> Tensor:
    """(B, L) bool: the positions of a collated batch an answer may copy from.

    A source is a real (attended) prompt position (``labels`` ignored, so never a supervised
    answer token) holding a text token (id below ``first_new_id``: no grounding token), outside
    the image and region slots, and not the first position (it has no previous token).
    """
    ids = batch["input_ids"]
    valid = (
        batch["attention_mask"].bool()
        & (batch["labels"] == IGNORE_INDEX)
        & ~batch["image_slots"].bool()
        & (batch["region_slots"] < 0)
        & (ids < first_new_id)
    )
    valid[:, 0] = False
    return valid


def previous_tokens(ids: Tensor) -> Tensor:
    """(B, L) ids shifted right by one (position 0 repeats itself): ``x_{s-1}`` of each s."""
    return torch.cat([ids[:, :1], ids[:, :-1]], dim=1)
