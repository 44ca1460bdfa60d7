"""CopyHead (groma_px/llm/copy_head.py): the mixture maths, and GromaPX's decode-time logits
against teacher-forced ones with the region pointer (phrase query), the copy head and the
describe head."""

from __future__ import annotations

import pytest
import torch

from groma_px.llm.copy_head import CopyHead, copy_sources, previous_tokens
from groma_px.llm.generation import greedy_generate
from groma_px.llm.pointer import MASKED_LOGIT
from groma_px.llm.sequence import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("single_thread")


def test_copy_mixture_is_one_softmax_over_vocabulary_and_sources():
    torch.manual_seed(0)
    head = CopyHead(8, dim=4)
    logits = torch.randn(2, 3, 6)
    hidden, current = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    src_hidden, src_prev = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    src_ids = torch.tensor([[1, 1, 4, 2, 0], [3, 3, 3, 5, 5]])
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, :, 4] = False  # source 4 of sample 0 may not be copied
    mask[1, 0] = False  # query 0 of sample 1 has no source at all
    out = head(logits, hidden, current, head.keys(src_hidden, src_prev), src_ids, mask)
    q = head.query(torch.cat([hidden, current], -1))
    k = head.key(torch.cat([src_hidden, src_prev], -1))
    scores = torch.einsum("bld,bsd->bls", q, k) * head.scale
    for b in range(2):
        for t in range(3):
            expected = logits[b, t].exp().clone()
            for s in range(5):
                if mask[b, t, s]:
                    expected[src_ids[b, s]] += scores[b, t, s].exp()
            torch.testing.assert_close(out[b, t], expected.log(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, 0], logits[1, 0])  # nothing to copy: logits unchanged
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_decode_step_equals_the_mixture_at_one_position():
    """``decode_step`` from a ``decoding_plan`` gives ``forward``'s logits for one query per
    row: repeated source tokens, a masked source, a row with no source (logits unchanged) and
    columns no source holds (bit for bit)."""
    torch.manual_seed(0)
    head = CopyHead(8, dim=4)
    logits = torch.randn(3, 9)
    logits[:, 7] = MASKED_LOGIT
    hidden, current = torch.randn(3, 8), torch.randn(3, 8)
    keys = head.keys(torch.randn(3, 6, 8), torch.randn(3, 6, 8))
    src_ids = torch.tensor([[1, 1, 4, 2, 0, 6], [3, 3, 3, 5, 5, 8], [2, 6, 6, 1, 0, 0]])
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4] = False  # token 0 of row 0: masked, held by no other source
    mask[1, 0] = False  # one of three 3s
    mask[2] = False  # row 2: nothing to copy
    with torch.no_grad():
        expected = head(
            logits[:, None], hidden[:, None], current[:, None], keys, src_ids, mask[:, None]
        )
        plan = head.decoding_plan(keys, src_ids, mask)
        out = head.decode_step(logits, hidden, current, plan)
    torch.testing.assert_close(out, expected[:, 0], atol=1e-6, rtol=1e-6)
    assert plan.tokens.tolist()[:2] == [[1, 2, 4, 6], [3, 5, 8, 3]]  # padded by the first
    held = torch.zeros(3, 9, dtype=torch.bool)
    held[0, [1, 2, 4, 6]] = held[1, [3, 5, 8]] = True
    assert torch.equal(out[~held], logits[~held])  # incl. row 2, column 7 and masked token 0
    assert not torch.equal(out[held], logits[held])


def test_copy_sources_are_attended_unsupervised_text_outside_slots():
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 90, 7, 8]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[IGNORE_INDEX] * 4 + [7, IGNORE_INDEX]]),
        "image_slots": torch.tensor([[False, False, True, False, False, False]]),
        "region_slots": torch.tensor([[-1, -1, -1, -1, -1, -1]]),
    }
    # 0: first position; 2: image slot; 3: grounding id (>= 50); 4: supervised; 5: padding.
    assert copy_sources(batch, first_new_id=50).tolist() == [
        [False, True, False, False, False, False]
    ]
    assert previous_tokens(batch["input_ids"]).tolist() == [[1, 1, 5, 6, 90, 7]]


@pytest.mark.parametrize(
    "copy_head, describe_head, relation, record",
    [
        (None, None, None, 0),
        ({}, None, None, 0),
        ({}, {}, None, 1),
        ({}, None, {}, 0),
        ({}, None, {"gated_phrase": True}, 0),
    ],
    ids=[
        "pointer",
        "pointer+copy",
        "pointer+copy+describe",
        "pointer+copy+relation",
        "pointer+copy+gated-relation",
    ],
)
@pytest.mark.parametrize("in_roi", [True, False], ids=["in-roi", "anywhere"])
def test_logits_while_decoding_equal_teacher_forced_ones(
    build_model, make_batch, copy_head, describe_head, relation, record, in_roi
):
    """Every decoding step's logits equal the teacher-forced ones; with
    ``region_tokens_in_roi`` the ``<ri>`` columns of a step not after ``<roi>`` or an ``<ri>``
    are masked instead, and the pointer head runs only at the other steps."""
    model = build_model(
        selector=dict(score_thr=0.0),
        region_head="pointer",
        region_pointer=dict(phrase_query=True, relation=relation),
        copy_head=copy_head,
        describe_head=describe_head,
        region_tokens_in_roi=in_roi,
    ).eval()
    scored = []  # the decoding steps at which the pointer head ran
    model.region_pointer.score = _recording(model.region_pointer.score, scored)
    if relation is not None:  # live subject and relation terms (both start near zero)
        torch.nn.init.constant_(model.region_pointer.relation.subject_weight, 1.0)
        torch.nn.init.constant_(model.region_pointer.relation.gate.bias, 2.0)
        if model.region_pointer.relation.keep is not None:  # unequal word gates
            torch.nn.init.normal_(model.region_pointer.relation.keep.weight)
    if describe_head is not None:  # a live gate (it starts at zero, the identity)
        torch.nn.init.normal_(model.describe_head.gate.weight)
        torch.nn.init.constant_(model.describe_head.gate.bias, 1.0)
    # two rows: record 0 (REC) and 1 (a region caption whose question cites a user region),
    # ``record`` first; only the first row writes <roi>, so the pointer scores rows apart
    data = model.data_preprocessor(make_batch([record, 1 - record], "test"), False)
    with torch.no_grad():
        perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        batch = model._embed(perception, data["data_samples"], padding_side="left")
        seen = []
        decode_fn = model._decode_logits_fn(batch)
        ids = model.token_ids
        # A word of the question inside a phrase, so the copy head has something to copy.
        words = batch["input_ids"][:, -3]
        forced = torch.tensor([[ids.phrase_start, ids.phrase_end, ids.roi_start]] * 2)
        forced = torch.cat([forced[:, :1], words[:, None], forced[:, 1:]], dim=1)
        forced[1, -1] = words[1]  # the second row writes a word in place of <roi>

        def forcing(logits, hidden, prefill, so_far, current=None):
            scored.append(None)  # a marker: the calls of score after it are this step's
            assert (current is None) == (so_far.shape[1] == 0)  # given after the first step
            if current is not None:  # the loop's embeddings of the latest tokens
                torch.testing.assert_close(current, model.llm.embed_tokens(so_far[:, -1]))
            seen.append(decode_fn(logits, hidden, prefill, so_far, current=current))
            step = so_far.shape[1]
            if step < forced.shape[1]:
                out = torch.full_like(seen[-1], -1e9)
                out[torch.arange(2), forced[:, step]] = 0.0
                return out
            return seen[-1]

        gen = greedy_generate(
            model.llm,
            batch["inputs_embeds"],
            batch["attention_mask"],
            max_new_tokens=8,
            eos_token_id=-1,  # all 8 steps in both rows
            pad_token_id=model._pad_id,
            logits_fn=forcing,
        )
        tokens = gen.tokens
        per_step = _split_markers(scored)  # before the teacher-forced pass adds its call
        n = tokens.shape[1]
        embeds = torch.cat([batch["inputs_embeds"], model.llm.embed_tokens(tokens)], dim=1)
        full = {
            "input_ids": torch.cat([batch["input_ids"], tokens], dim=1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1),
            "labels": torch.cat([batch["labels"], tokens], dim=1),  # generated: not sources
            "image_slots": torch.cat([batch["image_slots"], torch.zeros_like(tokens).bool()], 1),
            "region_slots": torch.cat([batch["region_slots"], torch.full_like(tokens, -1)], 1),
        }
        positions = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as greedy_generate
        out = model.llm(embeds, full["attention_mask"], positions)
        teacher = model._output_logits(out.logits, out.hidden_states, dict(batch, **full))
    assert n == 8 > forced.shape[1]
    length = batch["input_ids"].shape[1]
    cols = model._region_cols
    text = torch.ones(teacher.shape[-1], dtype=torch.bool)
    text[cols] = False
    previous = torch.cat([batch["input_ids"][:, -1:], tokens], dim=1)[:, :n]
    may_cite = torch.isin(previous, torch.tensor([ids.roi_start, *ids.regions]))
    assert may_cite[:, forced.shape[1]].tolist() == [True, False]
    assert not may_cite[:, : forced.shape[1]].any()
    rows_scored = [sum(calls) for calls in per_step]  # rows the pointer scored at each step
    assert rows_scored == (may_cite.sum(0).tolist() if in_roi else [2] * n)
    for step, logits in enumerate(seen):
        expected = teacher[:, length - 1 + step]
        for row in range(2):
            got, want = logits[row], expected[row]
            if in_roi and not may_cite[row, step]:
                assert (got[cols] == MASKED_LOGIT).all()
                got, want = got[text], want[text]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if describe_head is not None:  # the describe head changed the text logits
        assert [r.tolist() for r in batch["user_rows"]] == [[], [0]][:: 1 - 2 * record]
        model.describe_head = None
        without = model._output_logits(out.logits, out.hidden_states, dict(batch, **full))
        assert not torch.allclose(without, teacher, atol=1e-3)
    if relation is not None:  # the relation head changed the region logits
        model.region_pointer.relation = None
        without = model._output_logits(out.logits, out.hidden_states, dict(batch, **full))
        cols = model._region_cols[: batch["num_regions"][0]]
        at = length - 1 + forced.shape[1]  # predicts the token after <roi>
        assert not torch.allclose(without[0, at, cols], teacher[0, at, cols], atol=1e-3)
        return
    if copy_head is None or describe_head is not None:
        return
    # The copy head moved probability: the forced question word gained mass at step 1.
    plain = model._with_region_logits(out.logits, out.hidden_states, dict(batch, **full))
    at = length  # predicts the token after <p>
    word = int(words[0])
    assert teacher[0, at].log_softmax(-1)[word] > plain[0, at].log_softmax(-1)[word]


def test_supervised_only_mixing_equals_full_mixing_where_the_loss_reads(build_model, make_batch):
    model = build_model(region_head="pointer", copy_head=dict()).eval()
    data = model.data_preprocessor(make_batch([0, 10, 17]), True)
    with torch.no_grad():
        perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        batch = model._embed(perception, data["data_samples"], padding_side="right")
        out = model.llm(batch["inputs_embeds"], attention_mask=batch["attention_mask"])
        full = model._output_logits(out.logits, out.hidden_states, batch)
        fast = model._output_logits(out.logits, out.hidden_states, batch, supervised_only=True)
        plain = model._with_region_logits(out.logits, out.hidden_states, batch)
    read = torch.zeros_like(batch["labels"], dtype=torch.bool)
    read[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert read.sum() > 0
    torch.testing.assert_close(fast[read], full[read])
    assert torch.equal(fast[~read], plain[~read])
    assert not torch.allclose(full[read], plain[read])  # the copy head did mix there


def _recording(method, calls: list):
    """``method``, appending the rows of its first argument to ``calls`` at each call."""

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape[0])
        return method(*args, **kwargs)

    return wrapped


def _split_markers(calls: list) -> list[list]:
    """``[None, 2, None, None, 1]`` -> ``[[2], [], [1]]``: the calls after each ``None``
    marker."""
    groups: list[list] = []
    for call in calls:
        if call is None:
            groups.append([])
        else:
            groups[-1].append(call)
    return groups


def test_decoding_copy_mixes_one_position_per_row(build_model):
    model = build_model(copy_head={}).eval()
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    hidden = torch.zeros(1, 2, model.llm.hidden_size)
    with pytest.raises(ValueError, match="one position per row, got 2"):
        model._with_copy_logits(torch.zeros(1, 2, 8), hidden, batch, hidden, batch["input_ids"])
