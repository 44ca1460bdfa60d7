"""``PhraseRelationHead``: a second hop for the region pointer when the cited phrase relates two
objects ("the triangle to the left of the star").

The pointer's phrase query is the mean embedding of the phrase, so for a relational phrase it
mixes the target's words with the anchor's and cannot say where the target stands. This head
reads the phrase the way a compositional modular network does (Hu et al., 2017, "Modeling
Relationships in Referring Expressions with Compositional Modular Networks"): one causal
self-attention layer over the phrase's token embeddings (with their position in the phrase)
gives each word a context, three softmax-weighted pools of the word embeddings (their weights
learnt from that context) give a *subject*, a *relation* and an *anchor* phrase, and region i
gets

    a * (q(subject) . k_i) + g(relation) * sum_{j != i} softmax_j(q(anchor) . k_j) * r_ij

where ``q`` is the pointer's own phrase query (so "star" as an anchor is matched in the space
the region-text alignment trains), ``k`` the pointer's feature keys, ``r_ij = w(relation) .
phi(box_i, box_j)`` a learnt function of the pair's geometry, ``a`` a scalar and ``g`` a sigmoid
gate, both starting near zero so that the plain pointer is where training starts.

With ``gated_phrase=True`` the head also gives the pointer's own phrase term its input: instead
of the plain mean of the phrase's words (which, for "the object to the right of the square",
votes for squares), a mean weighted by a per-word sigmoid gate read from the same word contexts.
The gate starts equal for every word, so the pool starts as the plain mean; it can learn to
drop the relation's and the anchor's words, which the subject and two-hop terms then handle.

Everything is a function of the token ids up to each position, so the scores at decode time
(recomputed over the prompt and the tokens generated so far) equal the teacher-forced ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Geometry features per region pair (see :func:`pair_geometry`).
GEOMETRY_FEATURES = 8


def phrase_layout(
    token_ids: Tensor, *, phrase_start: int, phrase_end: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Where each position's current phrase starts and whether the position is one of its words.

    The current phrase at position t is the tokens after the latest ``<p>`` at or before t, up to
    that phrase's ``</p>`` (the markers excluded), as in
    :func:`groma_px.llm.pointer.phrase_embeddings`.

    Args:
        token_ids: (B, L) long ids.
        phrase_start: Id of ``<p>``.
        phrase_end: Id of ``</p>``.

    Returns:
        ``(start (B, L) long: index of the latest <p>, -1 before any; inside (B, L) bool: the
        position is a word of a phrase; offset (B, L) long: its index within the phrase, 0
        outside)``.
    """
    length = token_ids.shape[1]
    index = torch.arange(length, device=token_ids.device).expand_as(token_ids)
    none = torch.full_like(token_ids, -1)
    start = torch.where(token_ids == phrase_start, index, none).cummax(dim=1).values
    last_close = torch.where(token_ids == phrase_end, index, none).cummax(dim=1).values
    inside = (start > last_close) & (token_ids != phrase_start) & (start >= 0)
    offset = torch.where(inside, index - start - 1, torch.zeros_like(index))
    return start, inside, offset


def pair_geometry(boxes: Tensor) -> Tensor:
    """Features of every ordered region pair (i, j) from normalised xyxy boxes.

    The centre of i against j's near and far edges on each axis (the signs of the first four
    decide left of / right of / above / below), the centre offsets and the log size ratios, each
    scaled to about unit range.

    Args:
        boxes: (B, K, 4) normalised xyxy.

    Returns:
        (B, K, K, ``GEOMETRY_FEATURES``) float.
    """
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = (x1 - x0).clamp(min=1e-4), (y1 - y0).clamp(min=1e-4)
    i, j = (slice(None), slice(None), None), (slice(None), None, slice(None))
    feats = [
        cx[i] - x0[j],
        cx[i] - x1[j],
        cy[i] - y0[j],
        cy[i] - y1[j],
        cx[i] - cx[j],
        cy[i] - cy[j],
    ]
    feats = [f * 4.0 for f in feats]
    feats += [(w[i] / w[j]).log(), (h[i] / h[j]).log()]
    return torch.stack(feats, dim=-1)


class PhraseRelationHead(nn.Module):
    """Subject and two-hop relation terms added to the region pointer's scores.

    Args:
        hidden_size: Width D of the token embeddings.
        dim: Width of the pointer's queries and keys.
        num_heads: Heads of the phrase self-attention. Defaults to 4.
        max_phrase_len: Positions within a phrase that get their own embedding (later ones
            share the last). Defaults to 32.
        geometry_dim: Width of the pair-geometry code ``phi``. Defaults to 64.
        gate_bias: Initial bias of the relation gate (sigmoid(-4) ~ 0.02). Defaults to -4.0.
        gated_phrase: Also pool a per-word gated mean of the phrase for the pointer's phrase
            term (see the module docstring). Defaults to False.
    """

    def __init__(
        self,
        hidden_size: int,
        dim: int,
        num_heads: int = 4,
        max_phrase_len: int = 32,
        geometry_dim: int = 64,
        gate_bias: float = -4.0,
        gated_phrase: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.max_phrase_len = max_phrase_len
        self.position = nn.Embedding(max_phrase_len, hidden_size)
        self.in_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.pool = nn.Linear(hidden_size, 3)  # subject, relation, anchor word weights
        self.keep = None  # per-word gate of the pointer's phrase pool
        if gated_phrase:
            self.keep = nn.Linear(hidden_size, 1)
            nn.init.zeros_(self.keep.weight)  # equal gates: the plain mean at the start
            nn.init.zeros_(self.keep.bias)
        self.relation = nn.Linear(hidden_size, geometry_dim)
        self.gate = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        self.geometry = nn.Sequential(
            nn.Linear(GEOMETRY_FEATURES, geometry_dim),
            nn.GELU(),
            nn.Linear(geometry_dim, geometry_dim),
        )
        self.subject_weight = nn.Parameter(torch.zeros(()))
        self.scale = 1.0 / math.sqrt(dim)

    def pools(
        self,
        token_ids: Tensor,
        embeds: Tensor,
        *,
        phrase_start: int,
        phrase_end: int,
        last: int | None = None,
    ) -> tuple[Tensor, ...]:
        """(B, T, D) subject, relation and anchor pools of each position's current phrase (its
        words up to the position; zero where there is none), for the last ``last`` positions
        (T of them; all L by default); with ``gated_phrase`` a fourth, the gated phrase mean.

        Each position pools its own phrase's words (at most W). A word's weight comes from its
        context, which depends only on its phrase's words up to it: for every position at once
        the contexts are computed once per word (one masked attention over L); for a decoding
        step (``last=1``) only the current phrase's few words are gathered and attended, so
        the step does not pay for the whole prompt.
        """
        start, inside, offset = phrase_layout(
            token_ids, phrase_start=phrase_start, phrase_end=phrase_end
        )
        length = token_ids.shape[1]
        rows = length if last is None else min(last, length)
        s_index = torch.arange(length, device=token_ids.device)
        t_index = s_index[length - rows :]
        # (B, T, L): s is a word of t's current phrase, at or before t.
        same = (start[:, -rows:, None] == start[:, None, :]) & inside[:, None, :]
        same = same & (s_index[None, None, :] <= t_index[None, :, None])
        width = max(1, int(same.sum(-1).max()))
        # Those words' positions in order, padded with L (absent).
        order = torch.where(same, s_index, length).sort(dim=-1).values[..., :width]
        present = order < length  # (B, T, W)
        index = order.clamp(max=length - 1)

        def gather(t: Tensor) -> Tensor:  # (B, L, C) -> (B, T, W, C)
            flat = index.flatten(1)[..., None].expand(-1, -1, t.shape[-1])
            return t.gather(1, flat).unflatten(1, index.shape[1:])

        embeds = embeds.to(self.qkv.weight.dtype)
        x = self._word_inputs(embeds, offset)
        if rows * width < length:  # a few positions: attend among their phrases' words only
            w = torch.arange(width, device=token_ids.device)
            attend = (w[None, :] <= w[:, None]) & present[..., None, :]
            logits = self._word_logits(gather(x), attend)
        else:  # every position: each word's context once, over its phrase up to it
            words = (start[:, :, None] == start[:, None, :]) & inside[:, None, :]
            attend = words & (s_index[None, :] <= s_index[:, None])
            logits = gather(self._word_logits(x[:, None], attend[:, None])[:, 0])
        keep = None
        if self.keep is not None:
            logits, keep = logits[..., :3], torch.sigmoid(logits[..., 3:])
            keep = keep * present[..., None]
            keep = keep / keep.sum(dim=2, keepdim=True).clamp(min=1e-6)  # (B, T, W, 1)
        logits = logits.masked_fill(~present[..., None], float("-inf"))  # (B, T, W, 3)
        weights = torch.softmax(logits, dim=2).nan_to_num(0.0)  # no words -> 0
        if keep is not None:
            weights = torch.cat([weights, keep.to(weights.dtype)], dim=-1)
        pooled = torch.einsum("btwp,btwd->pbtd", weights, gather(embeds))
        return tuple(pooled.unbind(0))

    def word_gates(self, embeds: Tensor) -> Tensor:
        """(N,) the ``gated_phrase`` gates (before normalisation) of one phrase's N words, given
        their (N, D) token embeddings; each word's gate reads its context up to it.

        Raises:
            ValueError: If the head was built without ``gated_phrase``.
        """
        if self.keep is None:
            raise ValueError("word_gates needs PhraseRelationHead(gated_phrase=True)")
        num = embeds.shape[0]
        offset = torch.arange(num, device=embeds.device)
        x = self._word_inputs(embeds.to(self.qkv.weight.dtype), offset)[None, None]
        causal = torch.ones(num, num, dtype=torch.bool, device=embeds.device).tril()
        return torch.sigmoid(self._word_logits(x, causal[None, None])[0, 0, :, 3])

    def _word_inputs(self, embeds: Tensor, offset: Tensor) -> Tensor:
        """Word embeddings with their position within the phrase, normalised."""
        return self.in_norm(embeds + self.position(offset.clamp(max=self.max_phrase_len - 1)))

    def _word_logits(self, words: Tensor, attend: Tensor) -> Tensor:
        """(B, T, N, 3) pool logits (4 with the phrase gate's) of N words each, from a causal
        self-attention within their phrase (``attend`` (B, T, N, N); every word also attends
        to itself)."""
        num = words.shape[2]
        attend = attend | torch.eye(num, dtype=torch.bool, device=words.device)
        qkv = self.qkv(words).unflatten(-1, (3, self.num_heads, -1))  # (B, T, N, 3, H, d)
        q, k, v = qkv.flatten(0, 1).permute(2, 0, 3, 1, 4)  # each (B*T, H, N, d)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend.flatten(0, 1)[:, None])
        context = context.transpose(1, 2).flatten(2).unflatten(0, words.shape[:2])
        context = self.norm(words + self.proj(context))
        if self.keep is None:
            return self.pool(context)
        return torch.cat([self.pool(context), self.keep(context)], dim=-1)

    def forward(
        self,
        token_ids: Tensor,
        embeds: Tensor,
        keys: Tensor,
        boxes: Tensor,
        valid: Tensor,
        phrase_query: nn.Module,
        *,
        phrase_start: int,
        phrase_end: int,
        last: int | None = None,
        pools: tuple[Tensor, ...] | None = None,
        pair_code: Tensor | None = None,
    ) -> Tensor:
        """Scores to add to the pointer's logits.

        Args:
            token_ids: (B, L) ids of the prompt and what was generated so far.
            embeds: (B, L, D) their token embeddings.
            keys: (B, K, d) the pointer's feature keys of each sample's regions.
            boxes: (B, K, 4) the regions' normalised xyxy boxes (anything where not valid).
            valid: (B, K) bool; False for regions a sample does not have.
            phrase_query: The pointer's phrase-query network (D -> d).
            phrase_start: Id of ``<p>``.
            phrase_end: Id of ``</p>``.
            last: Return only the last ``last`` positions (the decoding steps). Defaults to all.
            pools: What :meth:`pools` returned for these arguments, if already computed.
            pair_code: What :meth:`pair_code` returned for ``boxes`` and ``valid``, if already
                computed (decoding steps share it).

        Returns:
            (B, L or last, K) float scores (zero on invalid regions).
        """
        if pools is None:
            pools = self.pools(
                token_ids, embeds, phrase_start=phrase_start, phrase_end=phrase_end, last=last
            )
        return self.scores(pools, keys, boxes, valid, phrase_query, pair_code)

    def pair_code(self, boxes: Tensor, valid: Tensor) -> Tensor:
        """(B, K_i, K_j, G) geometry codes ``phi_ij`` of every ordered pair of valid, distinct
        regions (zero elsewhere), from (B, K, 4) normalised xyxy boxes and (B, K) validity."""
        num = boxes.shape[1]
        pair_ok = valid[:, :, None] & valid[:, None, :]
        pair_ok = pair_ok & ~torch.eye(num, dtype=torch.bool, device=valid.device)
        geometry = pair_geometry(boxes).to(self.relation.weight.dtype)
        return self.geometry(geometry) * pair_ok[..., None]

    def scores(
        self,
        pools: tuple[Tensor, ...],
        keys: Tensor,
        boxes: Tensor,
        valid: Tensor,
        phrase_query: nn.Module,
        pair_code: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` from the (B, T, D) :meth:`pools` of T positions: (B, T, K) scores
        (``pair_code``: :meth:`pair_code` of ``boxes`` and ``valid``, computed if None)."""
        subject, relation, anchor = pools[:3]
        query_subject = phrase_query(subject.to(keys.dtype))
        query_anchor = phrase_query(anchor.to(keys.dtype))
        subject_scores = torch.einsum("bld,bkd->blk", query_subject, keys) * self.scale
        anchor_logits = torch.einsum("bld,bkd->blk", query_anchor, keys) * self.scale
        anchor_logits = anchor_logits.masked_fill(~valid[:, None, :], float("-inf"))
        anchor_prob = torch.softmax(anchor_logits, dim=-1).nan_to_num(0.0)  # (B, L, K_j)
        code = self.pair_code(boxes, valid) if pair_code is None else pair_code
        # r_ij = w(relation) . phi_ij, weighted by the anchor's probability of being j.
        weighted = torch.einsum("blj,bijg->blig", anchor_prob.to(code.dtype), code)
        relation_scores = torch.einsum("blg,blig->bli", self.relation(relation), weighted)
        gate = torch.sigmoid(self.gate(relation))  # (B, L, 1)
        scores = self.subject_weight * subject_scores + gate * relation_scores.to(gate.dtype)
        return scores.masked_fill(~valid[:, None, :], 0.0)
