"""``RegionPointerHead``: logits of ``<ri>`` as the match between a hidden state and region i."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .relation import PhraseRelationHead

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

    With ``phrase_query=True`` the query also gets ``q_p(mean of the token embeddings of the
    current phrase)``: the words between the latest ``<p>`` and its ``</p>`` (see
    :func:`phrase_embeddings`), so the phrase the answer just wrote reaches the pointer directly
    rather than only through the LLM's attention (MDETR-style phrase-region alignment).

    With ``relation=dict(...)`` (needs ``phrase_query``) a :class:`PhraseRelationHead` adds a
    subject term and a second hop through an anchor region and the pair's geometry, for phrases
    such as "the triangle to the left of the star".

    Args:
        hidden_size: The LLM's hidden size D.
        dim: Width of queries and keys; defaults to D.
        phrase_query: Add the pooled-phrase term to the query. Defaults to False.
        relation: Keyword arguments of :class:`PhraseRelationHead`; None: off. Defaults to None.
    """

    def __init__(
        self,
        hidden_size: int,
        dim: int | None = None,
        phrase_query: bool = False,
        relation: dict | None = None,
    ) -> None:
        super().__init__()
        dim = dim or hidden_size
        self.query = nn.Linear(hidden_size, dim)
        self.phrase_query = (
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
            if phrase_query
            else None
        )
        self.key = nn.Linear(hidden_size, dim)
        self.feature_key = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
        self.scale = 1.0 / math.sqrt(dim)
        self.relation = None
        if relation is not None:
            if self.phrase_query is None:
                raise ValueError("RegionPointerHead(relation=...) needs phrase_query=True")
            self.relation = PhraseRelationHead(hidden_size, dim, **relation)

    def forward(
        self,
        hidden: Tensor,
        slot_hidden: Tensor,
        slot_feats: Tensor,
        slot_valid: Tensor,
        phrase: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Pointer logits.

        Args:
            hidden: (B, L, D) hidden states that predict the next token.
            slot_hidden: (B, K, D) hidden states at each region's slot.
            slot_feats: (B, K, D) region tokens (as spliced into the prompt).
            slot_valid: (B, K) bool; False for regions a sample does not have.
            phrase: (B, L, D) pooled phrase embedding at each position of ``hidden``; required
                when the head was built with ``phrase_query=True``, ignored otherwise.
            bias: (B, L, K) scores added before masking (the relation head's). Defaults to None.

        Returns:
            (B, L, K) logits; ``MASKED_LOGIT`` where ``slot_valid`` is False.
        """
        return self.score(
            hidden, self.region_keys(slot_hidden, slot_feats), slot_valid, phrase, bias
        )

    def region_keys(self, slot_hidden: Tensor, slot_feats: Tensor) -> Tensor:
        """(B, K, d) keys ``k(h_slot_i) + k_f(f_i)`` of :meth:`forward`'s arguments (fixed
        while decoding one batch)."""
        return self.key(slot_hidden) + self.feature_key(slot_feats)

    def score(
        self,
        hidden: Tensor,
        keys: Tensor,
        slot_valid: Tensor,
        phrase: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` from the :meth:`region_keys` ``keys``."""
        query = self.query(hidden)
        if self.phrase_query is not None:
            if phrase is None:
                raise ValueError("RegionPointerHead(phrase_query=True) needs the pooled phrase")
            query = query + self.phrase_query(phrase.to(query.dtype))
        scores = torch.einsum("bld,bkd->blk", query, keys) * self.scale
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        return scores.masked_fill(~slot_valid[:, None, :], MASKED_LOGIT)


def phrase_embeddings(
    token_ids: Tensor, embeds: Tensor, *, phrase_start: int, phrase_end: int
) -> Tensor:
    """Mean embedding of the current phrase at every position.

    The current phrase at position t is the tokens after the latest ``<p>`` at or before t, up to
    t or to that phrase's ``</p>`` (the markers themselves excluded). So at the ``<roi>`` that
    follows ``<p>the red star</p>``, and at every ``<ri>`` inside that ``<roi>``, it is the mean
    of "the red star"; before any ``<p>``, or right after one, it is zero.

    Args:
        token_ids: (B, L) long ids.
        embeds: (B, L, D) their token embeddings.
        phrase_start: Id of ``<p>``.
        phrase_end: Id of ``</p>``.

    Returns:
        (B, L, D) pooled phrase embeddings.
    """
    length = token_ids.shape[1]
    index = torch.arange(length, device=token_ids.device).expand_as(token_ids)
    none = torch.full_like(token_ids, -1)
    last_open = torch.where(token_ids == phrase_start, index, none).cummax(dim=1).values
    last_close = torch.where(token_ids == phrase_end, index, none).cummax(dim=1).values
    inside = (last_open > last_close) & (token_ids != phrase_start)
    weights = inside.to(embeds.dtype)[..., None]
    sums = torch.cumsum(embeds * weights, dim=1)
    counts = torch.cumsum(weights, dim=1)
    # Subtract what came before the current <p> (the prefix sums at that position).
    start = last_open.clamp(min=0)[..., None]
    sums = sums - sums.gather(1, start.expand_as(sums))
    counts = counts - counts.gather(1, start)
    pooled = sums / counts.clamp(min=1.0)
    return pooled.masked_fill((last_open < 0)[..., None], 0.0)


def phrase_window(token_ids: Tensor, *, phrase_start: int, last: int = 1) -> int:
    """First column of ``token_ids`` that the current phrases of its last ``last`` positions
    start at or after.

    A position's current phrase (:func:`phrase_embeddings`, ``PhraseRelationHead.pools``) is read
    from the tokens after the latest ``<p>`` at or before it, so the pools of the last positions
    computed over ``token_ids[:, window:]`` equal those over the whole row: decoding steps then
    embed and pool a few words instead of the prompt and every token generated so far. Rows with
    no ``<p>`` up to the first of those positions do not hold the window back (their phrases are
    empty unless one opens within the window).

    Args:
        token_ids: (B, L) long ids.
        phrase_start: Id of ``<p>``.
        last: The positions whose phrases are needed (the last ``last``). Defaults to 1.

    Returns:
        The window's first column, in ``[0, L - last]``.
    """
    length = token_ids.shape[1]
    if length == 0:
        return 0
    first = max(0, length - last)
    opens = token_ids[:, : first + 1] == phrase_start
    index = torch.arange(first + 1, device=token_ids.device)
    latest = torch.where(opens, index, -1).amax(dim=1)  # (B,): -1 where a row has no <p>
    latest = latest[latest >= 0]
    return int(latest.min()) if latest.numel() else first


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
    phrase: Tensor | None = None,
    relation: dict | None = None,
    cache: dict | None = None,
    rows: Tensor | None = None,
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
        phrase: (B, L', D) pooled phrase embeddings for a ``phrase_query`` head (replaced by
            the relation head's gated pool when it has ``gated_phrase``).
        relation: Inputs of the head's ``PhraseRelationHead`` when it has one: ``token_ids``
            (B, L) and ``embeds`` (B, L, D) of everything up to the last position of
            ``hidden``, ``region_boxes`` (sum K_b, 4) normalised xyxy, ``phrase_start`` and
            ``phrase_end`` ids.
        cache: A dict kept across the decoding steps of one batch: the regions' keys, boxes and
            pair-geometry codes, which do not change between the steps, are stored in it at the
            first step and read at the next ones. Defaults to None (computed every call).
        rows: (R,) long indices of the rows of ``logits`` to score, while decoding
            (``prefill`` given): ``hidden``, ``phrase`` and the relation's ``token_ids`` and
            ``embeds`` then hold only these rows, and the other rows' ``<ri>`` columns are all
            masked. Defaults to None (every row).
    """
    if rows is not None and prefill is None:
        raise ValueError("pointer_logits scores a subset of rows only while decoding (prefill)")
    regions = None if cache is None else cache.get("regions")
    if regions is None:  # what does not change between the decoding steps of one batch
        regions = _region_inputs(pointer, hidden if prefill is None else prefill, batch, relation)
        if cache is not None:
            cache["regions"] = regions
    if rows is not None:
        regions = {name: value[rows] for name, value in regions.items()}
    bias = None
    if pointer.relation is not None:
        if relation is None:
            raise ValueError("a pointer with a relation head needs its relation inputs")
        markers = dict(phrase_start=relation["phrase_start"], phrase_end=relation["phrase_end"])
        pools = pointer.relation.pools(
            relation["token_ids"], relation["embeds"], last=hidden.shape[1], **markers
        )
        if pointer.relation.keep is not None:  # the gated phrase replaces the plain mean
            phrase = pools[3]
        bias = pointer.relation.scores(
            pools,
            regions["feature_keys"],
            regions["boxes"],
            regions["valid"],
            pointer.phrase_query,
            regions["pair_code"],
        )
    scores = pointer.score(hidden, regions["keys"], regions["valid"], phrase, bias)
    scores = scores.to(logits.dtype)  # (B, L', K_max)
    out = logits.clone()
    out[..., region_cols] = MASKED_LOGIT
    if rows is None:
        out[..., region_cols[: scores.shape[-1]]] = scores
    else:
        scored = out[rows]
        scored[..., region_cols[: scores.shape[-1]]] = scores
        out[rows] = scored
    return out


def _region_inputs(
    pointer: RegionPointerHead, source: Tensor, batch: dict, relation: dict | None
) -> dict[str, Tensor]:
    """The pointer's per-region inputs: ``valid`` (B, K), ``keys`` (B, K, d) from the slots'
    hidden states in ``source``; with a relation head also its ``feature_keys``, ``boxes`` and
    ``pair_code``."""
    positions, valid = slot_positions(batch["region_slots"], batch["num_regions"])
    slot_hidden = source.gather(1, positions[..., None].expand(-1, -1, source.shape[-1]))
    feats = padded_rows(batch["region_feats"], batch["num_regions"], positions.shape[1])
    out = dict(valid=valid, keys=pointer.region_keys(slot_hidden, feats))
    if pointer.relation is not None and relation is not None:
        boxes = padded_rows(relation["region_boxes"], batch["num_regions"], positions.shape[1])
        out.update(
            feature_keys=pointer.feature_key(feats),
            boxes=boxes,
            pair_code=pointer.relation.pair_code(boxes, valid),
        )
    return out


def padded_rows(rows: Tensor, counts: list[int], width: int) -> Tensor:
    """(sum K_b, D) rows, sample after sample -> (B, width, D), zero-padded."""
    out = rows.new_zeros(len(counts), width, rows.shape[-1])
    start = 0
    for b, k in enumerate(counts):
        out[b, :k] = rows[start : start + k]
        start += k
    return out
