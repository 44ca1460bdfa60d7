"""Pooled phrase embeddings of the region pointer's phrase query (pure maths)."""

import pytest
import torch

from groma_px.llm.pointer import RegionPointerHead, phrase_embeddings

P, EP, ROI, R0 = 100, 101, 102, 103  # <p>, </p>, <roi>, <r0>


def test_phrase_embeddings_average_the_current_phrase():
    # x <p> a b </p> <roi> <r0> y <p> c </p> <p>
    ids = torch.tensor([[7, P, 1, 2, EP, ROI, R0, 8, P, 3, EP, P]])
    embeds = torch.zeros(1, ids.shape[1], 2)
    for t, value in enumerate([9.0, 9.0, 1.0, 3.0, 9.0, 9.0, 9.0, 9.0, 9.0, 10.0, 9.0, 9.0]):
        embeds[0, t] = torch.tensor([value, -value])
    out = phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=EP)[0, :, 0]
    expected = [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 10.0, 10.0, 0.0]
    assert out.tolist() == expected
    assert torch.equal(phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=EP)[0, :, 1], -out)


def test_phrase_embeddings_rows_are_independent_and_unclosed_phrases_pool_so_far():
    ids = torch.tensor([[P, 1, 2, 3], [5, 5, P, 4]])
    embeds = torch.arange(8, dtype=torch.float32).reshape(2, 4, 1)
    out = phrase_embeddings(ids, embeds, phrase_start=P, phrase_end=EP)[..., 0]
    assert out.tolist() == [[0.0, 1.0, 1.5, 2.0], [0.0, 0.0, 0.0, 7.0]]


def test_phrase_query_changes_the_scores_and_is_required():
    torch.manual_seed(0)
    head = RegionPointerHead(8, phrase_query=True)
    hidden, slots, feats = torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    valid = torch.ones(1, 2, dtype=torch.bool)
    a = head(hidden, slots, feats, valid, torch.zeros(1, 3, 8))
    b = head(hidden, slots, feats, valid, torch.randn(1, 3, 8))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pooled phrase"):
        head(hidden, slots, feats, valid)
