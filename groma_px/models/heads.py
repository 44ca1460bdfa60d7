"""``GromaPX``'s output heads beyond the LLM's: the region pointer's ``<ri>`` logits (training
and decoding), the copy head and the mask head (training logits, masks of the cited regions at
predict). The region-text alignment loss is in ``region_text_loss.py``."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.structures import BaseDataElement
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ..llm.copy_head import CopyPlan, copy_sources, previous_tokens
from ..llm.pointer import (
    MASKED_LOGIT,
    padded_rows,
    phrase_embeddings,
    phrase_window,
    pointer_logits,
)
from ..llm.sequence import IGNORE_INDEX
from .masks import CitedRegions, first_citations, logits_to_rle
from .outputs import Perception


class GroundingHeadsMixin:
    """Methods of ``GromaPX`` for ``region_head="pointer"``, ``copy_head`` and ``mask_head``."""

    def _output_logits(
        self,
        logits: Tensor,
        hidden: Tensor,
        batch: dict[str, Tensor],
        prefill: Tensor | None = None,
        token_ids: Tensor | None = None,
        describe_keys: tuple[Tensor, Tensor, Tensor] | None = None,
        step_cache: dict | None = None,
        region_rows: Tensor | None = None,
        **copy_options: Any,
    ) -> Tensor:
        """The LLM's logits with the pointer's ``<ri>`` columns, the describe head and the copy
        head applied (the arguments as for :meth:`_with_region_logits`; ``describe_keys`` as
        :meth:`_describe_keys` returns them, computed if None; ``copy_options``
        (``supervised_only``, ``plan``, ``current``) go to :meth:`_with_copy_logits`)."""
        logits = self._with_region_logits(
            logits, hidden, batch, prefill, token_ids, step_cache, region_rows
        )
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
        plan: CopyPlan | None = None,
        current: Tensor | None = None,
    ) -> Tensor:
        """``logits`` mixed with ``CopyHead`` scores over the prompt's text, if configured.

        Teacher-forced (``prefill`` None), position t may copy sources s <= t;
        ``supervised_only`` mixes only the positions that predict a supervised token (the
        others keep the LLM's logits; the loss reads no other). While decoding (one position
        per row), the query is the latest token and the sources are the whole prompt, through
        ``CopyHead.decode_step`` (``plan``: :meth:`_copy_plan` of the batch, computed if None;
        ``current``: (B, D) embeddings of ``token_ids[:, -1]``, computed if None)."""
        if self.copy_head is None:
            return logits
        if prefill is not None:
            if hidden.shape[1] != 1:
                raise ValueError(f"decoding mixes one position per row, got {hidden.shape[1]}")
            plan = self._copy_plan(batch, prefill) if plan is None else plan
            if current is None:
                current = self.llm.embed_tokens(token_ids[:, -1])
            return self.copy_head.decode_step(logits[:, 0], hidden[:, 0], current, plan)[:, None]
        prompt = batch["input_ids"]
        valid = copy_sources(batch, self.llm.first_new_id)
        keys = self._copy_keys(hidden, prompt)
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

    def _copy_plan(self, batch: dict[str, Tensor], prefill: Tensor) -> CopyPlan:
        """``CopyHead.decoding_plan`` of a batch's prompt from its (B, L, D) hidden states."""
        prompt = batch["input_ids"]
        return self.copy_head.decoding_plan(
            self._copy_keys(prefill, prompt), prompt, copy_sources(batch, self.llm.first_new_id)
        )

    def _with_region_logits(
        self,
        logits: Tensor,
        hidden: Tensor,
        batch: dict[str, Tensor],
        prefill: Tensor | None = None,
        token_ids: Tensor | None = None,
        step_cache: dict | None = None,
        region_rows: Tensor | None = None,
    ) -> Tensor:
        """``logits`` with the ``<ri>`` columns from the pointer head, if configured
        (``pointer_logits``; while decoding, ``prefill`` holds the prompt's states,
        ``token_ids`` the prompt and the tokens generated so far, and ``step_cache`` a dict
        kept across one batch's steps for what does not change between them).

        ``region_rows`` (decoding only): (B,) bool, the rows whose next token may be an
        ``<ri>``; the others get ``MASKED_LOGIT`` in every ``<ri>`` column, and the pointer
        head scores only the rows that may. None: every row may. No later head reads the
        ``<ri>`` columns of a row to change its text columns, so those are the same either
        way."""
        if self.region_head != "pointer" or (
            region_rows is not None and not bool(region_rows.any())
        ):
            return _mask_region_columns(logits, self._region_cols, region_rows)
        rows = None
        if region_rows is not None and not bool(region_rows.all()):
            rows = region_rows.nonzero()[:, 0]
            hidden, token_ids = hidden[rows], token_ids[rows]
        phrase = relation = None
        if self.region_pointer.phrase_query is not None:
            markers = dict(
                phrase_start=self.token_ids.phrase_start, phrase_end=self.token_ids.phrase_end
            )
            if token_ids is None:
                ids = batch["input_ids"]
            else:  # decoding: only the words since the latest <p> can reach the pools (exact)
                start = phrase_window(
                    token_ids, phrase_start=markers["phrase_start"], last=hidden.shape[1]
                )
                ids = token_ids[:, start:]
            embeds = self.llm.embed_tokens(ids)
            head = self.region_pointer.relation
            if head is None or head.keep is None:  # else pointer_logits reads the gated pool
                phrase = phrase_embeddings(ids, embeds, **markers)[:, -hidden.shape[1] :]
            if head is not None:
                relation = dict(
                    token_ids=ids,
                    embeds=embeds,
                    region_boxes=batch["region_boxes"],
                    **markers,
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
            cache=step_cache,
            rows=rows,
        )

    def _region_may_follow(self) -> Tensor:
        """(V,) bool: the tokens an ``<ri>`` may follow under ``region_tokens_in_roi``
        (``<roi>`` and the ``<ri>`` themselves); a lookup, as ``torch.isin`` sorts its inputs at
        every call."""
        table = torch.zeros(self.llm.vocab_size, dtype=torch.bool, device=self._region_cols.device)
        table[self._region_cols] = True
        table[self.token_ids.roi_start] = True
        return table

    def _decode_logits_fn(self, batch: dict[str, Any]) -> Any:
        """The per-step logits hook of generation (None for the linear region head with no copy
        head and ``region_tokens_in_roi`` off)."""
        constrain = self.region_tokens_in_roi
        if self.region_head != "pointer" and self.copy_head is None and not constrain:
            return None

        cached: dict[str, Any] = {}  # copy and describe keys, computed at the first step
        may_precede = self._region_may_follow()

        def logits_fn(
            logits: Tensor,
            hidden: Tensor,
            prefill: Tensor,
            so_far: Tensor,
            current: Tensor | None = None,
        ) -> Tensor:
            ids = torch.cat([batch["input_ids"], so_far.to(batch["input_ids"])], dim=1)
            region_rows = may_precede[ids[:, -1]] if constrain else None
            if self.copy_head is not None and "copy" not in cached:
                cached["copy"] = self._copy_plan(batch, prefill)
            if self.describe_head is not None and "describe" not in cached:
                cached["describe"] = self._describe_keys(batch)
            out = self._output_logits(
                logits[:, None],
                hidden[:, None],
                batch,
                prefill,
                token_ids=ids,
                describe_keys=cached.get("describe"),
                plan=cached.get("copy"),
                current=current,
                step_cache=cached.setdefault("pointer", {}),
                region_rows=region_rows,
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


def _mask_region_columns(logits: Tensor, region_cols: Tensor, rows: Tensor | None) -> Tensor:
    """``logits`` (B, L, V) with ``MASKED_LOGIT`` in the ``region_cols`` of the rows where
    ``rows`` (B,) is False; ``logits`` itself when ``rows`` is None or all True."""
    if rows is None or bool(rows.all()):
        return logits
    masked = logits.index_fill(-1, region_cols, MASKED_LOGIT)
    if not bool(rows.any()):
        return masked
    return torch.where(rows[:, None, None], logits, masked)
