"""Tests for ``groma_px.llm.generation.greedy_generate`` on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groma_px.llm.adapter import GroundedCausalLM
from groma_px.llm.generation import greedy_generate

VOCAB = 300
NUM_NEW = 20
PAD = 0
TINY = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
NEVER = VOCAB + NUM_NEW - 1  # an eos id the tests make unreachable or that random weights miss


def tiny_lm(first_new_id: int = VOCAB) -> GroundedCausalLM:
    torch.manual_seed(0)
    lm = GroundedCausalLM(first_new_id=first_new_id, num_new_tokens=NUM_NEW, config=TINY)
    return lm.eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``(3, 6)`` with prompts of 6, 3 and 1 tokens (left padding with PAD) and the mask."""
    ids = torch.randint(4, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def mute_new_head(lm: GroundedCausalLM) -> None:
    """Make every grounding token's logit -1e4, so decoding picks base tokens like the bare LLM."""
    head = nn.Linear(lm.hidden_size, NUM_NEW, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, -1e4)
    lm.new_head = head


def generate(lm: GroundedCausalLM, ids: torch.Tensor, mask: torch.Tensor, eos: int, steps: int):
    embeds = lm.embed_tokens(ids)
    return greedy_generate(
        lm, embeds, mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=PAD
    )


@torch.no_grad()
def reference_without_cache(
    lm: GroundedCausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int
):
    """Recompute the whole sequence at every step: tokens (B, T) and predicting states (B, T, D)."""
    tokens, hiddens = [], []
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(lm.embed_tokens(ids), attention_mask=mask, position_ids=position_ids)
        next_id = out.logits[:, -1].argmax(-1)
        tokens.append(next_id)
        hiddens.append(out.hidden_states[:, -1])
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, 1), torch.stack(hiddens, 1)


def test_kv_cache_decoding_equals_full_recomputation_with_left_padding() -> None:
    lm = tiny_lm(first_new_id=VOCAB - 10)  # grounding tokens can be generated and fed back
    with torch.no_grad():
        lm.new_head.weight.mul_(3.0)  # make them likely to win some steps
    ids, mask = left_padded_batch()
    out = generate(lm, ids, mask, eos=NEVER, steps=8)
    ref_tokens, ref_hidden = reference_without_cache(lm, ids, mask, steps=8)
    assert out.tokens.shape == (3, 8) and out.tokens.dtype == torch.long
    assert torch.equal(out.tokens, ref_tokens)
    assert out.hidden_states.shape == (3, 8, 64)
    torch.testing.assert_close(out.hidden_states, ref_hidden, rtol=1e-4, atol=1e-5)


def test_eos_stops_each_sequence_and_pads_after_it() -> None:
    lm = tiny_lm()
    ids, mask = left_padded_batch()
    free = generate(lm, ids, mask, eos=NEVER, steps=8).tokens
    eos = int(free[0, 2])
    out = generate(lm, ids, mask, eos=eos, steps=8)
    lengths = []
    for row, tokens in zip(free, out.tokens, strict=True):
        hits = (row == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 8  # generated length, eos included
        lengths.append(n)
        assert torch.equal(tokens[:n], row[:n])
        assert (tokens[n:] == PAD).all()
        assert (out.hidden_states[len(lengths) - 1, n:] == 0).all()
    assert lengths[0] <= 3
    assert out.tokens.shape[1] == max(lengths)  # stops once every sequence is done


def test_stops_at_once_when_all_sequences_emit_eos() -> None:
    lm = tiny_lm()
    ids, mask = left_padded_batch()
    first = generate(lm, ids, mask, eos=NEVER, steps=1).tokens[:, 0]
    out = greedy_generate(
        lm,
        lm.embed_tokens(ids),
        mask,
        max_new_tokens=8,
        eos_token_id=first.tolist(),
        pad_token_id=PAD,
    )
    assert torch.equal(out.tokens, first[:, None])


def test_matches_hugging_face_generate_of_the_bare_model() -> None:
    lm = tiny_lm()
    mute_new_head(lm)
    ids, mask = left_padded_batch()
    free = generate(lm, ids, mask, eos=NEVER, steps=10).tokens
    eos = int(free[1, 3])
    ours = generate(lm, ids, mask, eos=eos, steps=10).tokens
    hf = lm.hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    assert ours[1, 3] == eos and (ours[1, 4:] == PAD).all()  # one row stops mid-way
    assert torch.equal(ours, hf[:, ids.shape[1] :])


def test_zero_new_tokens_and_bad_shapes() -> None:
    lm = tiny_lm()
    ids, mask = left_padded_batch()
    out = generate(lm, ids, mask, eos=NEVER, steps=0)
    assert out.tokens.shape == (3, 0) and out.hidden_states.shape == (3, 0, 64)
    with pytest.raises(ValueError, match="disagree"):
        generate(lm, ids, mask[:, 1:], eos=NEVER, steps=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, ids, mask, eos=NEVER, steps=-1)


def test_hidden_states_can_be_left_out() -> None:
    lm = tiny_lm()
    ids, mask = left_padded_batch()
    out = greedy_generate(
        lm,
        lm.embed_tokens(ids),
        mask,
        max_new_tokens=3,
        eos_token_id=[NEVER],
        pad_token_id=PAD,
        output_hidden_states=False,
    )
    assert out.hidden_states is None and out.tokens.shape == (3, 3)


@pytest.mark.gpu
def test_bfloat16_generation_on_gpu() -> None:
    torch.manual_seed(0)
    lm = GroundedCausalLM(
        first_new_id=VOCAB, num_new_tokens=NUM_NEW, config=TINY, dtype="bfloat16"
    ).cuda()
    ids, mask = (t.cuda() for t in left_padded_batch())
    out = generate(lm.eval(), ids, mask, eos=NEVER, steps=4)
    assert out.tokens.shape == (3, 4) and out.hidden_states.dtype == torch.bfloat16
