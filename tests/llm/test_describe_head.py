"""DescribeHead (groma_px/llm/describe_head.py): the gated region-to-word bias."""

from __future__ import annotations

import torch

from groma_px.llm.describe_head import DescribeHead


def test_bias_is_the_gated_attention_weighted_word_region_match():
    torch.manual_seed(0)
    head = DescribeHead(8, dim=4)
    torch.nn.init.normal_(head.gate.weight)
    logits, hidden = torch.randn(2, 3, 7), torch.randn(2, 3, 8)
    words, regions = torch.randn(5, 4), torch.randn(2, 2, 4)  # 5 text tokens, 2 new ids
    valid = torch.tensor([[True, False], [False, False]])  # sample 1 cites no user region
    out = head(logits, hidden, regions, head.match(regions, words), valid)
    for t in range(3):
        # sample 0: one valid region, so all attention goes to it
        expected = head.gate(hidden[0, t]) * (regions[0, 0] @ words.T) * head.scale
        torch.testing.assert_close(out[0, t, :5], logits[0, t, :5] + expected)
    assert torch.equal(out[0, :, 5:], logits[0, :, 5:])  # grounding ids untouched
    assert torch.equal(out[1], logits[1])  # no user region: unchanged
    out.sum().backward()
    assert head.query.weight.grad is not None and torch.isfinite(head.gate.weight.grad).all()


def test_attention_splits_between_user_regions_and_the_head_starts_as_identity():
    torch.manual_seed(1)
    head = DescribeHead(6, dim=3)
    logits, hidden = torch.randn(1, 2, 4), torch.randn(1, 2, 6)
    words, regions = torch.randn(4, 3), torch.randn(1, 2, 3)
    valid = torch.ones(1, 2, dtype=torch.bool)
    match = head.match(regions, words)
    assert torch.equal(head(logits, hidden, regions, match, valid), logits)  # zero gate
    torch.nn.init.constant_(head.gate.bias, 2.0)
    out = head(logits, hidden, regions, match, valid)
    attend = (head.query(hidden[0]) @ regions[0].T * head.scale).softmax(-1)  # (2, U)
    torch.testing.assert_close(
        out[0], logits[0] + 2.0 * attend @ (regions[0] @ words.T * head.scale)
    )
    empty = head(logits, hidden, regions[:, :0], match[:, :0], valid[:, :0])
    assert torch.equal(empty, logits)
