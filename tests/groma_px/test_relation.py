"""PhraseRelationHead (groma_px/llm/relation.py): the phrase layout, the pair geometry, causality,
and that the pointer with it learns "the A left of the B" where the plain pointer cannot."""

from __future__ import annotations

import pytest
import torch

from groma_px.llm.pointer import RegionPointerHead, phrase_embeddings, phrase_window
from groma_px.llm.relation import PhraseRelationHead, pair_geometry, phrase_layout

pytestmark = pytest.mark.usefixtures("single_thread")

P, Q = 8, 9  # <p>, </p>


def test_phrase_layout_marks_words_of_the_current_phrase():
    ids = torch.tensor([[1, P, 2, 3, Q, 4, P, 5, Q]])
    start, inside, offset = phrase_layout(ids, phrase_start=P, phrase_end=Q)
    assert start.tolist() == [[-1, 1, 1, 1, 1, 1, 6, 6, 6]]
    assert inside.tolist() == [[False, False, True, True, False, False, False, True, False]]
    assert offset.tolist() == [[0, 0, 0, 1, 0, 0, 0, 0, 0]]


def test_pair_geometry_signs_decide_the_relations():
    # Box 0 left of and above box 1.
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.7]]])
    geo = pair_geometry(boxes)
    assert geo.shape == (1, 2, 2, 8)
    assert geo[0, 0, 1, 0] < 0 and geo[0, 0, 1, 2] < 0  # cx_0 < x0_1, cy_0 < y0_1
    assert geo[0, 1, 0, 1] > 0 and geo[0, 1, 0, 3] > 0  # cx_1 > x1_0, cy_1 > y1_0
    torch.testing.assert_close(geo[0, 0, 1, 6], torch.tensor(0.5).log())  # w ratio 0.2 / 0.4
    torch.testing.assert_close(geo[0, 1, 1, 4:], torch.zeros(4))  # a box against itself


def test_attention_pools_reduce_to_the_phrase_mean_with_equal_weights():
    torch.manual_seed(0)
    head = PhraseRelationHead(16, 16, num_heads=2)
    torch.nn.init.zeros_(head.pool.weight)
    torch.nn.init.zeros_(head.pool.bias)
    ids = torch.tensor([[1, P, 2, 3, 4, Q, 5]])
    embeds = torch.randn(1, 7, 16)
    mean = phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=Q)
    for pool in head.pools(ids, embeds, phrase_start=P, phrase_end=Q):
        torch.testing.assert_close(pool, mean)


def test_gated_phrase_pool_starts_as_the_mean_and_can_drop_words():
    torch.manual_seed(0)
    head = PhraseRelationHead(16, 16, num_heads=2, gated_phrase=True)
    ids = torch.tensor([[1, P, 2, 3, 4, Q, 5]])
    embeds = torch.randn(1, 7, 16)
    mean = phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=Q)
    pools = head.pools(ids, embeds, phrase_start=P, phrase_end=Q)
    assert len(pools) == 4  # subject, relation, anchor, gated phrase
    torch.testing.assert_close(pools[3], mean)  # equal gates at the start
    # A gate that closes on word 4 leaves the mean of words 2 and 3 once the phrase has all three.
    torch.nn.init.zeros_(head.position.weight)
    with torch.no_grad():
        head.keep.weight.copy_(torch.randn(1, 16))
    gated = head.pools(ids, embeds, phrase_start=P, phrase_end=Q)[3]
    assert not torch.allclose(gated[0, 5], mean[0, 5])
    assert (gated[0, 0] == 0).all()  # before any phrase: nothing
    # word_gates gives the weights of that pool: at </p>, the gated mean of words 2, 3 and 4.
    with torch.no_grad():
        gates = head.word_gates(embeds[0, 2:5])
    expected = (gates[:, None] * embeds[0, 2:5]).sum(0) / gates.sum()
    torch.testing.assert_close(gated[0, 5], expected)
    # Without gated_phrase there are three pools and no gate.
    plain = PhraseRelationHead(16, 16, num_heads=2)
    assert len(plain.pools(ids, embeds, **_MARKERS)) == 3
    with pytest.raises(ValueError, match="gated_phrase=True"):
        plain.word_gates(embeds[0, 2:5])


_MARKERS = dict(phrase_start=P, phrase_end=Q)


def test_gated_phrase_pool_depends_only_on_tokens_so_far():
    torch.manual_seed(0)
    head = PhraseRelationHead(16, 8, num_heads=2, gated_phrase=True)
    torch.nn.init.normal_(head.keep.weight)
    ids = torch.tensor([[1, P, 2, 3, 4, Q, 5, 6], [P, 2, Q, 1, P, 4, 3, Q]])
    embeds = torch.randn(2, 8, 16)
    full = head.pools(ids, embeds, **_MARKERS)[3]
    for t in range(1, 9):
        prefix = head.pools(ids[:, :t], embeds[:, :t], last=1, **_MARKERS)[3]
        torch.testing.assert_close(prefix[:, 0], full[:, t - 1], atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_tokens_so_far_and_last_slices():
    torch.manual_seed(0)
    head = PhraseRelationHead(16, 8, num_heads=2, gate_bias=1.0)
    torch.nn.init.constant_(head.subject_weight, 1.0)
    query = torch.nn.Linear(16, 8)
    ids = torch.tensor([[1, P, 2, 3, 4, Q, 5, 6], [P, 2, Q, 1, P, 4, 3, Q]])
    embeds = torch.randn(2, 8, 16)
    keys, boxes = torch.randn(2, 3, 8), torch.rand(2, 3, 4).sort(-1).values[..., [0, 1, 2, 3]]
    valid = torch.tensor([[True, True, True], [True, True, False]])
    args = dict(phrase_start=P, phrase_end=Q)
    full = head(ids, embeds, keys, boxes, valid, query, **args)
    assert full.shape == (2, 8, 3)
    assert (full[1, :, 2] == 0).all()  # an absent region gets nothing
    assert full[0, 4].abs().sum() > 0  # inside a phrase: live scores
    for t in range(1, 8):  # a prefix scores its positions exactly as the whole sequence does
        prefix = head(ids[:, :t], embeds[:, :t], keys, boxes, valid, query, last=1, **args)
        torch.testing.assert_close(prefix[:, 0], full[:, t - 1], atol=1e-5, rtol=1e-5)
    # Decoding steps reuse the pair codes of the first: the same scores.
    code = head.pair_code(boxes, valid)
    assert code.shape == (2, 3, 3, 64) and not code[1, 2].any() and not code[0, 1, 1].any()
    reused = head(ids, embeds, keys, boxes, valid, query, pair_code=code, **args)
    torch.testing.assert_close(reused, full)
    wrong = head(ids, embeds, keys, boxes, valid, query, pair_code=torch.zeros_like(code), **args)
    assert not torch.allclose(wrong, full)  # the codes are what the relation term reads


def test_phrase_window_starts_at_the_latest_open_phrase_of_any_row():
    ids = torch.tensor(
        [[1, P, 2, Q, 3, P, 4, 5], [1, 2, 3, 4, P, 6, Q, 7], [1, 2, 3, 4, 5, 6, 7, 2]]
    )
    assert phrase_window(ids, phrase_start=P) == 4  # row 1's <p> at 4; row 0's at 5
    assert phrase_window(ids[[0, 2]], phrase_start=P) == 5
    assert phrase_window(ids[[2]], phrase_start=P) == 7  # no phrase anywhere: the last token
    assert phrase_window(ids[[2]], phrase_start=P, last=3) == 5
    assert phrase_window(ids[[0]], phrase_start=P, last=4) == 1  # positions 4..7: <p> at 1
    assert phrase_window(ids[:, :0], phrase_start=P) == 0


@pytest.mark.parametrize("gated", [False, True])
def test_pools_over_the_phrase_window_equal_those_over_the_whole_row(gated):
    torch.manual_seed(0)
    head = PhraseRelationHead(16, 8, num_heads=2, gated_phrase=gated)
    if gated:
        torch.nn.init.normal_(head.keep.weight)
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):  # random rows of words, <p> and </p>, some phrases left open
        ids = torch.randint(1, 8, (3, 30), generator=generator)
        markers = torch.rand(3, 30, generator=generator)
        ids[markers < 0.12] = P
        ids[(markers > 0.9) & (markers < 0.97)] = Q
        embeds = torch.randn(3, 30, 16, generator=generator)
        for t in range(1, 31):
            for last in (1, 2):
                if last > t:
                    continue
                start = phrase_window(ids[:, :t], phrase_start=P, last=last)
                whole = head.pools(ids[:, :t], embeds[:, :t], last=last, **_MARKERS)
                window = head.pools(ids[:, start:t], embeds[:, start:t], last=last, **_MARKERS)
                for a, b in zip(whole, window, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                mean = phrase_embeddings(ids[:, :t], embeds[:, :t], **_MARKERS)[:, -last:]
                cut = phrase_embeddings(ids[:, start:t], embeds[:, start:t], **_MARKERS)
                torch.testing.assert_close(mean, cut[:, -last:], atol=1e-5, rtol=1e-5)


def test_relation_head_needs_the_phrase_query():
    with pytest.raises(ValueError, match="phrase_query"):
        RegionPointerHead(16, relation=dict())


def _relational_scenes(
    gen: torch.Generator, n: int, dim: int, vocab: torch.Tensor, ask_anchor: bool = False
):
    """ "the A <left|right> of the B" (two A's, one on each side of B, plus distractors C, D) or
    "the C" (a unique C), or with ``ask_anchor`` "the C" or "the B" (the anchor as a target).
    Returns ids (n, 9), region features (n, 5, dim), boxes, targets."""
    THE, OF, LEFT, RIGHT, ROI = 0, 5, 6, 7, 10
    A, B, C, D = 1, 2, 3, 4
    ids, feats, boxes, targets = [], [], [], []
    for _ in range(n):
        cats = [A, A, B, C, D]
        xs = [
            0.05 + 0.2 * torch.rand(1, generator=gen).item(),  # A left of B
            0.75 + 0.2 * torch.rand(1, generator=gen).item(),  # A right of B
            0.45 + 0.1 * torch.rand(1, generator=gen).item(),  # B
        ] + torch.rand(2, generator=gen).mul(0.9).add(0.05).tolist()
        ys = torch.rand(5, generator=gen).mul(0.8).add(0.1).tolist()
        order = torch.randperm(5, generator=gen).tolist()
        kind = int(torch.randint(4, (1,), generator=gen))
        if kind == 0:
            ask = B if ask_anchor and torch.rand(1, generator=gen).item() < 0.5 else C
            seq, target = [P, THE, ask, Q, ROI, ROI, ROI, ROI, ROI], cats.index(ask)
        else:
            word, target = (LEFT, 0) if kind % 2 else (RIGHT, 1)
            seq = [P, THE, A, word, OF, THE, B, Q, ROI]
        ids.append(seq)
        feats.append(
            torch.stack([vocab[cats[i]] + 0.1 * torch.randn(dim, generator=gen) for i in order])
        )
        boxes.append(
            torch.tensor([[xs[i] - 0.04, ys[i] - 0.04, xs[i] + 0.04, ys[i] + 0.04] for i in order])
        )
        targets.append(order.index(target))
    return torch.tensor(ids), torch.stack(feats), torch.stack(boxes), torch.tensor(targets)


def _train_pointer(
    relation: dict | None, steps: int = 250, out: dict | None = None, ask_anchor: bool = False
) -> float:
    torch.manual_seed(0)
    dim = 32
    gen = torch.Generator().manual_seed(0)
    vocab = torch.randn(11, dim, generator=gen)
    pointer = RegionPointerHead(dim, phrase_query=True, relation=relation)
    optim = torch.optim.Adam(pointer.parameters(), lr=3e-3)

    def scores(ids, feats, boxes):
        embeds = vocab[ids]
        b, k = feats.shape[:2]
        valid = torch.ones(b, k, dtype=torch.bool)
        last = ids.shape[1] - 1  # the position after "</p>" (or a later <roi>)
        phrase = phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=Q)[:, last:]
        bias = None
        if pointer.relation is not None:
            pools = pointer.relation.pools(ids, embeds, last=1, **_MARKERS)
            if pointer.relation.keep is not None:
                phrase = pools[3]
            bias = pointer.relation(
                ids,
                embeds,
                pointer.feature_key(feats),
                boxes,
                valid,
                pointer.phrase_query,
                last=1,
                pools=pools,
                **_MARKERS,
            )
        zeros = torch.zeros(b, 1, dim)
        return pointer(zeros, torch.zeros(b, k, dim), feats, valid, phrase, bias)[:, 0]

    for _ in range(steps):
        ids, feats, boxes, targets = _relational_scenes(gen, 32, dim, vocab, ask_anchor)
        loss = torch.nn.functional.cross_entropy(scores(ids, feats, boxes), targets)
        optim.zero_grad()
        loss.backward()
        optim.step()
    ids, feats, boxes, targets = _relational_scenes(
        torch.Generator().manual_seed(1), 400, dim, vocab, ask_anchor
    )
    if out is not None:
        out.update(pointer=pointer, vocab=vocab)
    with torch.no_grad():
        return (scores(ids, feats, boxes).argmax(-1) == targets).float().mean().item()


def test_pointer_with_relation_head_resolves_left_and_right_of_an_anchor():
    # 3 of 4 questions are relational and the two A's differ only in where they stand: the
    # plain pointer is right on "the C" and at best half the relational ones (0.63 measured).
    plain = _train_pointer(None)
    relational = _train_pointer(dict(num_heads=2))
    assert plain < 0.7
    assert relational > 0.95


def test_gated_phrase_learns_to_drop_the_anchor_words():
    # In "the A left of the B" the plain mean votes for B as much as for A, and "the B" is also
    # asked for, so the phrase query cannot simply ignore B's word; the gate keeps the subject's
    # word and drops the anchor's.
    trained: dict = {}
    accuracy = _train_pointer(dict(num_heads=2, gated_phrase=True), out=trained, ask_anchor=True)
    assert accuracy > 0.95
    relation, vocab = trained["pointer"].relation, trained["vocab"]
    words = torch.tensor([0, 1, 6, 5, 0, 2])  # "the A left of the B"
    with torch.no_grad():  # each word's gate, from its context within the phrase
        gate = relation.word_gates(vocab[words])
    subject, anchor = gate[1].item(), gate[5].item()  # "A", "B"
    assert subject > 2 * anchor
