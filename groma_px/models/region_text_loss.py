"""``GromaPX``'s region-text alignment loss (``region_text_loss``, ``RegionTextAlignment``): the
words of each labelled region, embedded as the pointer embeds a cited phrase, against the feature
keys of the kept regions; relational queries add the pointer's relation-head scores."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor

from region_proposer.box_ops import normalize_boxes

from ..llm.pointer import padded_rows
from .outputs import Perception, rank_mean
from .region_text import batch_queries, match_regions, multi_positive_nce


class RegionTextLossMixin:
    """Methods of ``GromaPX`` for ``region_text_loss`` (needs the pointer's ``phrase_query``)."""

    def _region_text_losses(
        self,
        perception: Perception,
        batch: dict[str, Any],
        data_samples: list[BaseDataElement],
        valid_sizes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_region_text`` and ``region_text_acc`` (``RegionTextAlignment``): each query
        (a labelled region's words) is embedded as the pointer embeds a cited phrase (mean token
        embedding, ``phrase_query``) and scored against the feature keys of its image's kept
        regions (``negatives="image"``) or of the whole batch's (``"batch"``). Relational
        queries add the pointer's relation-head scores over their own image's regions
        (``region_text_rel_acc``: their accuracy)."""
        pointer = self.region_pointer
        align = self.region_text
        matched = []  # (labels, match, record boxes) per image
        for b, (sample, sel) in enumerate(zip(data_samples, perception.selections, strict=True)):
            labels = sample.metainfo.get("region_labels")
            if labels is None:
                raise ValueError(
                    f"sample {sample.metainfo.get('sample_id')!r} has no region_labels: "
                    "region_text_loss needs PackGroundedChatInputs(region_label_fields=...)"
                )
            gt = normalize_boxes(sample.gt_boxes.float(), valid_sizes[b]).clamp(0.0, 1.0)
            match = match_regions(gt.to(sel.boxes), sel.boxes, align.iou_thr)
            matched.append((labels, match, gt))
        queries = batch_queries(align, matched)
        texts = queries.texts
        keys = pointer.feature_key(batch["region_feats"])
        count = keys.new_tensor(float(len(texts)))
        if self.token_average == "global":  # every rank takes part, queries or not
            count = rank_mean(count)
        unused = sum(p.sum() for p in pointer.phrase_query.parameters())
        if pointer.relation is not None:
            unused = unused + sum(p.sum() for p in pointer.relation.parameters())
        zero = (keys.sum() + unused) * 0.0  # keeps every head in the graph (data-parallel sync)
        if not texts:
            out = {"loss_region_text": zero, "region_text_acc": zero.detach()}
            if align.relational_prob > 0:
                out["region_text_rel_acc"] = zero.detach()
            return out
        device = keys.device
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max(len(i) for i in ids)
        token_ids = torch.full((len(ids), width), self._pad_id, dtype=torch.long, device=device)
        present = torch.zeros(len(ids), width, dtype=torch.bool, device=device)
        for q, row in enumerate(ids):
            token_ids[q, : len(row)] = torch.tensor(row, device=device)
            present[q, : len(row)] = True
        pools = None
        if pointer.relation is not None and pointer.relation.keep is not None:
            # The gated phrase pool replaces the plain mean, as when the pointer reads a phrase.
            pools = self._query_pools(token_ids, present)
            phrases = pools[3][:, 0].to(keys.dtype)
        else:
            weights = present[..., None].to(keys.dtype)
            embeds = self.llm.embed_tokens(token_ids).to(keys.dtype)
            phrases = (embeds * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        phrase_queries = pointer.phrase_query(phrases)  # (Q, d)
        counts = torch.tensor(batch["num_regions"], device=device)
        k_max = int(counts.max())
        index = torch.tensor(queries.image_index, device=device)
        own = torch.arange(k_max, device=device)[None, :] < counts[index][:, None]  # (Q, K)
        if align.negatives == "batch":
            scores = phrase_queries @ keys.T * pointer.scale  # (Q, sum K)
            valid = torch.ones_like(scores, dtype=torch.bool)
            starts = torch.cumsum(counts, 0) - counts
            columns = starts[index][:, None] + torch.arange(k_max, device=device)[None, :]
        else:
            region_keys = padded_rows(keys, batch["num_regions"], k_max)[index]  # (Q, K, d)
            scores = torch.einsum("qd,qkd->qk", phrase_queries, region_keys) * pointer.scale
            valid = own.clone()
            columns = torch.arange(k_max, device=device).expand(len(texts), -1)
        relational = torch.tensor(queries.relational, dtype=torch.bool, device=device)
        if bool(relational.any()):
            if pointer.relation is None:
                raise ValueError(
                    "region_text_loss.relational_prob > 0 needs a pointer with a relation head "
                    "(region_pointer=dict(phrase_query=True, relation=dict()))"
                )
            bias = self._relational_query_scores(
                token_ids[relational],
                present[relational],
                keys,
                batch,
                index[relational],
                k_max,
                None if pools is None else tuple(p[relational] for p in pools),
            )  # (Q_r, K)
            rows = relational.nonzero()[:, 0]
            own_rows = own[rows]
            cols = columns[rows].clamp(max=scores.shape[1] - 1)
            # Relational queries compete over their own image's regions only.
            valid[rows] = False
            valid[rows[:, None].expand_as(cols)[own_rows], cols[own_rows]] = True
            scores = scores.index_put(
                (rows[:, None].expand_as(cols)[own_rows], cols[own_rows]),
                bias[own_rows].to(scores.dtype),
                accumulate=True,
            )
        positive = torch.zeros_like(valid)
        for q, rows_q in enumerate(queries.positives):
            positive[q, rows_q] = True
        loss, accuracy = multi_positive_nce(scores.float(), valid, positive, count.float())
        out = {"loss_region_text": align.weight * loss + zero, "region_text_acc": accuracy}
        if align.relational_prob > 0:
            best = scores.float().masked_fill(~valid, float("-inf")).argmax(-1)
            hits = positive[torch.arange(len(texts), device=device), best][relational]
            out["region_text_rel_acc"] = hits.float().mean() if len(hits) else zero.detach()
        return out

    def _relational_query_scores(
        self,
        token_ids: Tensor,
        present: Tensor,
        keys: Tensor,
        batch: dict[str, Any],
        image_index: Tensor,
        k_max: int,
        pools: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """(Q_r, K) relation-head scores of relational queries (right-padded ``token_ids``)
        over their image's regions, read as at the ``<roi>`` after ``<p>words</p>``
        (``pools``: their relation-head pools there, if already computed)."""
        pointer = self.region_pointer
        if pools is None:
            pools = self._query_pools(token_ids, present)
        counts = batch["num_regions"]
        region_keys = padded_rows(keys, counts, k_max)[image_index]
        boxes = padded_rows(batch["region_boxes"], counts, k_max)[image_index]
        num = torch.tensor(counts, device=keys.device)[image_index]
        valid = torch.arange(k_max, device=keys.device)[None, :] < num[:, None]
        return pointer.relation.scores(pools, region_keys, boxes, valid, pointer.phrase_query)[:, 0]

    def _phrase_sequences(self, token_ids: Tensor, present: Tensor) -> Tensor:
        """Left-padded ``<p> words </p>`` of right-padded queries, so that the last position
        closes every phrase."""
        markers = self.token_ids
        lengths = present.sum(1)
        width = int(lengths.max()) + 2
        seq = torch.full(
            (len(token_ids), width), self._pad_id, dtype=torch.long, device=token_ids.device
        )
        for q, n in enumerate(lengths.tolist()):
            seq[q, width - n - 2] = markers.phrase_start
            seq[q, width - n - 1 : width - 1] = token_ids[q, :n]
            seq[q, -1] = markers.phrase_end
        return seq

    def _query_pools(self, token_ids: Tensor, present: Tensor) -> tuple[Tensor, ...]:
        """The relation head's pools of right-padded queries, read at their ``</p>``
        (each (Q, 1, D))."""
        seq = self._phrase_sequences(token_ids, present)
        return self.region_pointer.relation.pools(
            seq,
            self.llm.embed_tokens(seq),
            phrase_start=self.token_ids.phrase_start,
            phrase_end=self.token_ids.phrase_end,
            last=1,
        )
