"""``GromaPX``'s output heads beyond the LLM's: the region pointer's ``<ri>`` logits (training
and decoding), the copy head, the region-text alignment loss and the mask head (training logits,
masks of the cited regions at predict)."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from region_proposer.box_ops import normalize_boxes

from ..llm.copy_head import copy_sources, previous_tokens
from ..llm.pointer import padded_rows, phrase_embeddings, pointer_logits
from ..llm.sequence import IGNORE_INDEX
from .masks import CitedRegions, first_citations, logits_to_rle
from .outputs import Perception, rank_mean
from .region_text import batch_queries, match_regions, multi_positive_nce


class GroundingHeadsMixin:
    """Methods of ``GromaPX`` for ``region_head="pointer"``, ``copy_head``, ``region_text_loss``
    and ``mask_head``."""

    def _output_logits(
        self,
        logits: Tensor,
        hidden: Tensor,
        batch: dict[str, Tensor],
        prefill: Tensor | None = None,
        token_ids: Tensor | None = None,
        describe_keys: tuple[Tensor, Tensor, Tensor] | None = None,
        **copy_options: Any,
    ) -> Tensor:
        """The LLM's logits with the pointer's ``<ri>`` columns, the describe head and the copy
        head applied (the arguments as for :meth:`_with_region_logits`; ``describe_keys`` as
        :meth:`_describe_keys` returns them, computed if None; ``copy_options``
        (``supervised_only``, ``keys``) go to :meth:`_with_copy_logits`)."""
        logits = self._with_region_logits(logits, hidden, batch, prefill, token_ids)
        if self.describe_head is not None:
            keys = self._describe_keys(batch) if describe_keys is None else describe_keys
            logits = self.describe_head(logits, hidden, *keys)
        return self._with_copy_logits(logits, hidden, batch, prefill, token_ids, **copy_options)

    def _describe_keys(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``DescribeHead`` inputs after the logits and hidden states: (B, U, d) pointer keys of
        each sample's user regions, their (B, U, V0) match with the text tokens' pointer keys
        and their (B, U) validity."""
        pointer = self.region_pointer
        first_new = self.llm.first_new_id
        keys = pointer.feature_key(batch["region_feats"])
        rows = batch["user_rows"]
        if max([len(r) for r in rows] + [0]) == 0:  # no user region in the batch
            empty = keys.new_zeros(len(rows), 0, keys.shape[1])
            return empty, keys.new_zeros(len(rows), 0, first_new), empty[..., 0].bool()
        # Users are always kept, so a sample with user rows has K >= 1.
        padded = padded_rows(keys, batch["num_regions"], max(batch["num_regions"]))
        index = pad_sequence([r.clamp(min=0) for r in rows], batch_first=True)
        valid = pad_sequence([r >= 0 for r in rows], batch_first=True)
        region_keys = padded.gather(1, index[..., None].expand(-1, -1, keys.shape[1]))
        ids = torch.arange(first_new, device=keys.device)
        words = pointer.phrase_query(self.llm.embed_tokens(ids))
        return region_keys, self.describe_head.match(region_keys, words.to(keys.dtype)), valid

    def _with_copy_logits(
        self,
        logits: Tensor,
        hidden: Tensor,
        batch: dict[str, Tensor],
        prefill: Tensor | None = None,
        token_ids: Tensor | None = None,
        *,
        supervised_only: bool = False,
        keys: Tensor | None = None,
    ) -> Tensor:
        """``logits`` mixed with ``CopyHead`` scores over the prompt's text, if configured.

        Teacher-forced (``prefill`` None), position t may copy sources s <= t;
        ``supervised_only`` mixes only the positions that predict a supervised token (the
        others keep the LLM's logits; the loss reads no other). While decoding, the query is
        the latest token and the sources are the whole prompt (``keys``: their copy keys, if
        already computed)."""
        if self.copy_head is None:
            return logits
        prompt = batch["input_ids"]
        valid = copy_sources(batch, self.llm.first_new_id)
        if keys is None:
            keys = self._copy_keys(hidden if prefill is None else prefill, prompt)
        if prefill is not None:
            current = self.llm.embed_tokens(token_ids[:, -hidden.shape[1] :])
            return self.copy_head(logits, hidden, current, keys, prompt, valid[:, None, :])
        positions = torch.arange(prompt.shape[1], device=prompt.device)
        causal = positions[None, :] <= positions[:, None]  # (t, s): s <= t
        if not supervised_only:
            current = self.llm.embed_tokens(prompt)
            return self.copy_head(logits, hidden, current, keys, prompt, valid[:, None] & causal)
        need = torch.zeros_like(valid)
        need[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        rows, cols = need.nonzero(as_tuple=True)
        mask = valid[rows] & causal[cols]
        mixed = self.copy_head(
            logits[rows, cols][:, None],
            hidden[rows, cols][:, None],
            self.llm.embed_tokens(prompt[rows, cols])[:, None],
            keys[rows],
            prompt[rows],
            mask[:, None, :],
        )
        out = logits.clone()
        out[rows, cols] = mixed[:, 0]
        return out

    def _copy_keys(self, source_hidden: Tensor, prompt: Tensor) -> Tensor:
        """(B, L, d) copy keys of every prompt position (hidden state, previous token)."""
        return self.copy_head.keys(source_hidden, self.llm.embed_tokens(previous_tokens(prompt)))

    def _with_region_logits(
        self,
        logits: Tensor,
        hidden: Tensor,
        batch: dict[str, Tensor],
        prefill: Tensor | None = None,
        token_ids: Tensor | None = None,
    ) -> Tensor:
        """``logits`` with the ``<ri>`` columns from the pointer head, if configured
        (``pointer_logits``; while decoding, ``prefill`` holds the prompt's states and
        ``token_ids`` the prompt and the tokens generated so far)."""
        if self.region_head != "pointer":
            return logits
        phrase = relation = None
        if self.region_pointer.phrase_query is not None:
            ids = batch["input_ids"] if token_ids is None else token_ids
            embeds = self.llm.embed_tokens(ids)
            markers = dict(
                phrase_start=self.token_ids.phrase_start, phrase_end=self.token_ids.phrase_end
            )
            phrase = phrase_embeddings(ids, embeds, **markers)[:, -hidden.shape[1] :]
            if self.region_pointer.relation is not None:
                relation = dict(
                    token_ids=ids, embeds=embeds, region_boxes=batch["region_boxes"], **markers
                )
        return pointer_logits(
            self.region_pointer,
            logits,
            hidden,
            batch,
            self._region_cols,
            prefill=prefill,
            phrase=phrase,
            relation=relation,
        )

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
        markers = self.token_ids
        seq = self._phrase_sequences(token_ids, present)
        embeds = self.llm.embed_tokens(seq)
        counts = batch["num_regions"]
        region_keys = padded_rows(keys, counts, k_max)[image_index]
        boxes = padded_rows(batch["region_boxes"], counts, k_max)[image_index]
        num = torch.tensor(counts, device=keys.device)[image_index]
        valid = torch.arange(k_max, device=keys.device)[None, :] < num[:, None]
        return pointer.relation(
            seq,
            embeds,
            region_keys,
            boxes,
            valid,
            pointer.phrase_query,
            phrase_start=markers.phrase_start,
            phrase_end=markers.phrase_end,
            last=1,
            pools=pools,
        )[:, 0]

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

    def _decode_logits_fn(self, batch: dict[str, Any]) -> Any:
        """The per-step logits hook of generation (None for the linear region head and no copy
        head)."""
        if self.region_head != "pointer" and self.copy_head is None:
            return None

        cached: dict[str, Any] = {}  # copy and describe keys, computed at the first step

        def logits_fn(logits: Tensor, hidden: Tensor, prefill: Tensor, so_far: Tensor) -> Tensor:
            ids = torch.cat([batch["input_ids"], so_far.to(batch["input_ids"])], dim=1)
            if self.copy_head is not None and "copy" not in cached:
                cached["copy"] = self._copy_keys(prefill, batch["input_ids"])
            if self.describe_head is not None and "describe" not in cached:
                cached["describe"] = self._describe_keys(batch)
            out = self._output_logits(
                logits[:, None],
                hidden[:, None],
                batch,
                prefill,
                token_ids=ids,
                describe_keys=cached.get("describe"),
                keys=cached.get("copy"),
            )
            return out[:, 0]

        return logits_fn

    def _mask_logits(
        self,
        perception: Perception,
        batch: dict[str, Any],
        inputs: Tensor,
        cited: Any,
        hidden: Tensor,
    ) -> Tensor:
        """(N, h, w) mask logits of the cited kept rows (``cited.batch_index``, ``cited.rows``)
        over the padded input, from the mask pyramid and the regions' tokens."""
        offsets = torch.tensor([0] + batch["num_regions"], device=inputs.device).cumsum(0)[:-1]
        region_feats = batch["region_feats"][offsets[cited.batch_index] + cited.rows]
        height, width = inputs.shape[-2:]
        sizes = perception.pyramids[self.consumers["mask"]].valid_sizes
        if sizes is None:
            sizes = torch.tensor([[height, width]] * len(inputs), device=inputs.device)
        scale = sizes.flip(-1).repeat(1, 2).to(hidden.dtype)  # (B, 4): w, h, w, h
        boxes = (
            torch.stack(
                [
                    perception.selections[b].boxes[r]
                    for b, r in zip(cited.batch_index.tolist(), cited.rows.tolist(), strict=True)
                ]
            )
            if len(cited)
            else hidden.new_zeros(0, 4)
        )
        boxes = boxes.to(hidden.dtype) * scale[cited.batch_index]
        # Pixel embeddings only for the images with a citation (the first one if none, so that
        # every parameter stays in the graph): a training batch's other samples cite nothing.
        images, batch_index = cited.batch_index.unique(sorted=True, return_inverse=True)
        if len(images) == 0:
            images = torch.zeros(1, dtype=torch.long, device=inputs.device)
        pyramid = perception.pyramids[self.consumers["mask"]]
        if len(images) < len(inputs):
            pyramid, inputs = pyramid.select(images), inputs[images]
        pixels = self.mask_head.pixel_embeddings(pyramid, inputs.to(hidden.dtype))
        return self.mask_head(
            pixels, batch_index, boxes, region_feats, (height, width), hidden=hidden
        )

    def _predict_masks(
        self,
        perception: Perception,
        batch: dict[str, Any],
        inputs: Tensor,
        generated: Any,
        data_samples: list[BaseDataElement],
    ) -> list[dict[int, dict]]:
        """Per sample, ``{kept row: RLE in original pixels}`` of every region it cites (the
        hidden state at the first citation conditions the mask)."""
        out: list[dict[int, dict]] = [{} for _ in data_samples]
        if self.mask_head is None:
            return out
        found = [
            (b, row, step)
            for b, tokens in enumerate(generated.tokens)
            for row, step in first_citations(tokens, self._region_cols, batch["num_regions"][b])
        ]
        if not found:
            return out
        b_idx, rows, steps = (
            torch.tensor(v, device=inputs.device) for v in zip(*found, strict=True)
        )
        cited = CitedRegions(b_idx, rows, rows, steps)
        hidden = generated.hidden_states[b_idx, steps]
        logits = self._mask_logits(perception, batch, inputs, cited, hidden)
        padded = tuple(inputs.shape[-2:])
        for (b, row, _), mask in zip(found, logits.float(), strict=True):
            out[b][row] = logits_to_rle(mask, padded, data_samples[b].metainfo)
        return out

    def _decode(self, tokens: Tensor) -> str:
        ids = tokens.tolist()
        stops = {self.tokenizer.eos_token_id, self._pad_id}
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=False)
