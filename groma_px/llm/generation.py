"""Greedy decoding with a KV cache for ``GroundedCausalLM`` from spliced input embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from groma_px.llm.adapter import GroundedCausalLM


class GenerationOutput(NamedTuple):
    """What ``greedy_generate`` returns.

    Attributes:
        tokens: ``(B, T)`` long generated ids (prompt excluded), ``T <= max_new_tokens``; each row
            ends at its first eos (kept) and is ``pad_token_id`` after it.
        hidden_states: ``(B, T, D)`` last-layer hidden states: ``hidden_states[:, t]`` is the
            state ``tokens[:, t]`` was predicted from (the state at the position before it, as in
            next-token training); zeros where ``tokens`` is padding. None when not requested.
    """

    tokens: Tensor
    hidden_states: Tensor | None


@torch.no_grad()
def greedy_generate(
    lm: GroundedCausalLM,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    output_hidden_states: bool = True,
    logits_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> GenerationOutput:
    """Greedy (argmax) decoding of a left-padded batch, reusing the KV cache between steps.

    The prompt is prefilled once from ``inputs_embeds`` (so image and region features can be
    spliced in); each later step feeds ``lm.embed_tokens`` of the previous token for one position.
    Positions count real tokens only (``attention_mask.cumsum - 1``), so left padding does not
    shift them. A sequence stops at its first eos; all stop when every sequence has or after
    ``max_new_tokens`` steps.

    Args:
        lm: The language model.
        inputs_embeds: ``(B, L, D)`` prompt embeddings, left-padded.
        attention_mask: ``(B, L)`` 1 on prompt tokens, 0 on the left padding.
        max_new_tokens: Most tokens to generate per sequence (>= 0).
        eos_token_id: Id or ids that end a sequence.
        pad_token_id: Id written after a sequence's eos (never fed to the model).
        output_hidden_states: Also return the hidden states. Defaults to True.
        logits_fn: Optional ``(logits (B, V), hidden (B, D), prefill_hidden (B, L, D),
            generated (B, t) long ids so far, current=(B, D) lm.embed_tokens of the latest
            generated tokens, None at the first step) -> logits`` applied before each argmax,
            e.g. ``GromaPX``'s region pointer, which scores regions against the prompt's hidden
            states and the phrase being written. Defaults to None.

    Returns:
        ``GenerationOutput``.

    Raises:
        ValueError: If ``max_new_tokens < 0`` or the shapes of the inputs disagree.
    """
    _check_inputs(inputs_embeds, attention_mask, max_new_tokens)
    if max_new_tokens == 0:
        return _empty_output(inputs_embeds, output_hidden_states)
    batch, device = attention_mask.shape[0], inputs_embeds.device
    eos_ids = torch.as_tensor(eos_token_id, device=device).reshape(-1)
    # Left padding: real tokens get positions 0..n-1; padding gets 0 (masked out anyway).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds, attention_mask, position_ids, use_cache=True, logits_to_keep=1)
    prefill_hidden = out.hidden_states
    next_position = position_ids[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, hiddens = [], []
    embeds = None  # token embeddings of the latest generated tokens
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if logits_fn is not None:
            so_far = torch.stack(tokens, dim=1) if tokens else attention_mask.new_zeros(batch, 0)
            current = None if embeds is None else embeds[:, 0]
            logits = logits_fn(
                logits, out.hidden_states[:, -1], prefill_hidden, so_far.long(), current=current
            )
        predicted = logits.argmax(dim=-1)
        tokens.append(torch.where(done, pad_token_id, predicted))
        if output_hidden_states:
            hiddens.append(out.hidden_states[:, -1].masked_fill(done[:, None], 0.0))
        done = done | torch.isin(predicted, eos_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        # Finished rows are fed their argmax, a valid id, and their outputs are ignored.
        embeds = lm.embed_tokens(predicted[:, None])
        out = lm(embeds, attention_mask, next_position, out.past_key_values, use_cache=True)
        next_position = next_position + 1
    hidden_states = torch.stack(hiddens, dim=1) if output_hidden_states else None
    return GenerationOutput(torch.stack(tokens, dim=1), hidden_states)


def _check_inputs(inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int) -> None:
    """Raise ``ValueError`` on a negative ``max_new_tokens`` or disagreeing ``(B, L)``."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if inputs_embeds.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} disagree on (B, L)"
        )


def _empty_output(inputs_embeds: Tensor, with_hidden: bool) -> GenerationOutput:
    """``max_new_tokens=0``: no model call; ``(B, 0)`` tokens and ``(B, 0, D)`` states."""
    batch, _, hidden_size = inputs_embeds.shape
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=inputs_embeds.device)
    hidden = inputs_embeds.new_zeros(batch, 0, hidden_size) if with_hidden else None
    return GenerationOutput(tokens, hidden)
