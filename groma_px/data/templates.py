"""Conversation templates: a record's turns -> token ids with role tags and a supervision mask."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..llm.vocab import FIXED_TOKENS
from .schema import ASSISTANT, HUMAN, REGION_PLACEHOLDERS, ROLES, count_region_placeholders

#: Vicuna v1's system prompt (FastChat ``vicuna_v1``, LLaVA ``conv_vicuna_v1``), used by Groma.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHAT_TEMPLATE = "chat_template"

# Grounding tokens are cut out of the text before the pieces between them are tokenised, so a
# placeholder is one id whatever the tokenizer's added-token flags (lstrip, normalized) say.
# Region tokens are matched as GroundingVocab.region_token spells them (<r0>, <r12>, never <r03>).
_GROUNDING_PATTERN = re.compile(
    "|".join([*(re.escape(t) for t in FIXED_TOKENS), "<r(?:0|[1-9][0-9]*)>"])
)


@dataclass(frozen=True)
class _RoleStyle:
    """A Vicuna-v1-style text layout: ``{system} {user} q {assistant} a</s>{user} q ...``."""

    system: str
    user: str
    assistant: str


_STYLES = {
    "groma": _RoleStyle(VICUNA_SYSTEM, "USER:", "ASSISTANT:"),
    "llava": _RoleStyle(VICUNA_SYSTEM, "USER:", "ASSISTANT:"),
    "default": _RoleStyle(VICUNA_SYSTEM, "USER:", "ASSISTANT:"),
    # Short tags and no system prompt: fewer tokens for the tiny CPU pipeline.
    "plain": _RoleStyle("", "Q:", "A:"),
}
TEMPLATE_NAMES = (*_STYLES, CHAT_TEMPLATE)


class ConversationError(ValueError):
    """A conversation cannot be encoded; ``turn`` is the index of the offending turn."""

    def __init__(self, turn: int, message: str) -> None:
        super().__init__(f"conversations[{turn}]: {message}")
        self.turn = turn


@dataclass(frozen=True)
class EncodedConversation:
    """One conversation as token ids.

    Attributes:
        input_ids: (L,) token ids, bos first for the string templates.
        label_mask: (L,) True where the id is supervised: the assistant answers and their eos.
        placeholder_turns: (P,) index of the turn each region placeholder (``<refer_box>``,
            ``<ground_box>``, ``<refer_feat>``) of ``input_ids`` came from, in order of appearance.
    """

    input_ids: list[int]
    label_mask: list[bool]
    placeholder_turns: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.label_mask):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and label_mask ({len(self.label_mask)}) "
                "differ in length"
            )


@dataclass(frozen=True)
class _Segment:
    """A run of text (or one special id) from one turn, supervised or not."""

    turn: int
    supervised: bool
    text: str = ""
    token_id: int | None = None


class ConversationTemplate:
    """Turns a record's ``conversations`` into token ids with role tags and a supervision mask.

    Layouts (``q``/``a``: human/assistant text; ``<s>``, ``</s>``: the tokenizer's bos/eos ids):

    - ``groma`` = ``llava`` = ``default`` (Vicuna v1, as in Groma):
      ``<s>{system} USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>``.
    - ``plain``: ``<s>Q: q A: a</s>Q: q A: a</s>`` (no system prompt).
    - ``chat_template``: the tokenizer's own ``apply_chat_template`` (roles user/assistant); the
      supervised part of each assistant turn is what its message adds after the generation
      prompt of the turns before it (its content and the template's end-of-turn text).

    Supervised: each answer with the separator before it (``" a"``: Vicuna tokenises the space
    into the answer's first token) and its eos; never the system prompt, role tags or human text.
    The text is encoded in segments (role prefix, answer, ...), each split on the grounding tokens
    first, so the generation prompt is exactly a prefix of the training ids. Segments are encoded
    independently, which equals encoding the whole text for byte-level BPE tokenizers (ours,
    GPT-2/Llama-3/Qwen style).

    Args:
        name: One of ``TEMPLATE_NAMES``. Defaults to ``"groma"``.
        system: System prompt replacing the template's default (``""``: none). For
            ``chat_template`` it is sent as a ``system`` message when given. Defaults to None.
    """

    def __init__(self, name: str = "groma", *, system: str | None = None) -> None:
        if name not in TEMPLATE_NAMES:
            raise ValueError(f"unknown conversation template {name!r}; known: {TEMPLATE_NAMES}")
        self.name = name
        self.system = system

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, system={self.system!r})"

    def encode(
        self,
        turns: list[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        for_generation: bool = False,
    ) -> EncodedConversation:
        """Encodes ``turns`` (``{"from": "human"|"gpt", "value": str}``, human first).

        Args:
            turns: The record's conversation.
            tokenizer: A tokenizer holding the grounding tokens (``GroundingVocab``).
            for_generation: Leave out the last assistant turn's text and end with the assistant
                prefix (``ASSISTANT:``), so the model generates the answer; ``label_mask`` is all
                False. A conversation ending with a human turn is encoded whole. Defaults to False.

        Returns:
            The ids, mask and the turn of every region placeholder.

        Raises:
            ConversationError: If the turns do not alternate human/gpt starting with human, a
                training conversation does not end with an assistant turn, a placeholder does
                not encode to its single id, or a chat template is not prefix-stable.
            ValueError: For ``chat_template`` if the tokenizer has none.
            KeyError: If the tokenizer lacks a grounding token of the text (``GroundingVocab``).
        """
        _check_roles(turns, for_generation=for_generation)
        num_encoded = len(turns)
        if for_generation and turns[-1]["from"] == ASSISTANT:
            num_encoded -= 1
        if self.name == CHAT_TEMPLATE:
            segments = self._chat_template_segments(turns, num_encoded, tokenizer, for_generation)
        else:
            segments = self._style_segments(turns, num_encoded, tokenizer)
        if for_generation:  # nothing is supervised in a prompt
            segments = [replace(s, supervised=False) for s in segments]
        encoded = _encode_segments(segments, tokenizer)
        _check_placeholders(turns[:num_encoded], encoded.placeholder_turns)
        return encoded

    def _style_segments(
        self, turns: list[dict[str, Any]], num_encoded: int, tokenizer: PreTrainedTokenizerBase
    ) -> list[_Segment]:
        style = _STYLES[self.name]
        system = style.system if self.system is None else self.system
        bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
        segments = [_Segment(turn=0, supervised=False, token_id=bos)]
        for i in range(0, num_encoded, 2):
            head = f"{system} " if i == 0 and system else ""
            prompt = f"{head}{style.user} {turns[i]['value']} {style.assistant}"
            segments.append(_Segment(turn=i, supervised=False, text=prompt))
            if i + 1 < num_encoded:
                answer = f" {turns[i + 1]['value']}"
                segments.append(_Segment(turn=i + 1, supervised=True, text=answer))
                segments.append(_Segment(turn=i + 1, supervised=True, token_id=eos))
        return segments

    def _chat_template_segments(
        self,
        turns: list[dict[str, Any]],
        num_encoded: int,
        tokenizer: PreTrainedTokenizerBase,
        for_generation: bool,
    ) -> list[_Segment]:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template {CHAT_TEMPLATE!r} needs a tokenizer with a chat_template, but "
                f"{type(tokenizer).__name__} has none; set tokenizer.chat_template or use one "
                f"of {tuple(_STYLES)}"
            )
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages = system + [
            {"role": "user" if t["from"] == HUMAN else "assistant", "content": t["value"]}
            for t in turns[:num_encoded]
        ]
        offset = len(system)

        def render(num_turns: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(
                messages[: offset + num_turns],
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )

        full = render(num_encoded, for_generation)
        segments, cursor = [], 0
        for i in range(1, num_encoded, 2):
            prefix, through = render(i, True), render(i + 1, False)
            if not (through.startswith(prefix) and full.startswith(through)):
                raise ConversationError(
                    i,
                    "the chat template is not prefix-stable (rendering more turns changes the "
                    "text of earlier ones), so the supervised span cannot be located",
                )
            segments.append(_Segment(turn=i - 1, supervised=False, text=prefix[cursor:]))
            segments.append(_Segment(turn=i, supervised=True, text=through[len(prefix) :]))
            cursor = len(through)
        segments.append(_Segment(turn=num_encoded - 1, supervised=False, text=full[cursor:]))
        return segments


def _check_roles(turns: list[dict[str, Any]], *, for_generation: bool) -> None:
    """Raise unless the turns alternate human/gpt from human (a training one ends with gpt)."""
    if not turns:
        raise ConversationError(0, "the conversation has no turns")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.get("from") != expected:
            raise ConversationError(
                i,
                f"expected from={expected!r} (turns alternate {HUMAN!r}, {ASSISTANT!r}, "
                f"starting with {HUMAN!r}), got {turn.get('from')!r}",
            )
        if not isinstance(turn.get("value"), str):
            raise ConversationError(i, f"value must be a string, got {turn.get('value')!r}")
    if not for_generation and turns[-1]["from"] != ASSISTANT:
        raise ConversationError(
            len(turns) - 1, "a training conversation must end with an assistant turn"
        )


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise ValueError(f"the tokenizer has no {which} token, which the string templates place")
    return int(token_id)


def _grounding_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a grounding token; the unknown-token id means the tokenizer lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise KeyError(
            f"grounding token {token!r} is missing from the tokenizer; call "
            "GroundingVocab.add_to_tokenizer(tokenizer) first"
        )
    return int(token_id)


def _encode_segments(
    segments: list[_Segment], tokenizer: PreTrainedTokenizerBase
) -> EncodedConversation:
    """Encodes the segments in order; text is split on grounding tokens before tokenising."""
    placeholder_ids = {_grounding_id(tokenizer, t) for t in REGION_PLACEHOLDERS}
    ids: list[int] = []
    mask: list[bool] = []
    placeholder_turns: list[int] = []
    for segment in segments:
        if segment.token_id is not None:
            seg_ids = [segment.token_id]
        else:
            seg_ids = _encode_text(segment.text, tokenizer)
        ids.extend(seg_ids)
        mask.extend([segment.supervised] * len(seg_ids))
        placeholder_turns.extend(segment.turn for t in seg_ids if t in placeholder_ids)
    return EncodedConversation(ids, mask, placeholder_turns)


def _encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    cursor = 0
    for match in _GROUNDING_PATTERN.finditer(text):
        if match.start() > cursor:
            ids.extend(tokenizer.encode(text[cursor : match.start()], add_special_tokens=False))
        ids.append(_grounding_id(tokenizer, match.group()))
        cursor = match.end()
    if cursor < len(text):
        ids.extend(tokenizer.encode(text[cursor:], add_special_tokens=False))
    return ids


def _check_placeholders(turns: list[dict[str, Any]], placeholder_turns: list[int]) -> None:
    """Every placeholder of each encoded turn's text must appear once in the ids."""
    for i, turn in enumerate(turns):
        expected = count_region_placeholders(turn["value"])
        found = placeholder_turns.count(i)
        if found != expected:
            raise ConversationError(
                i, f"{expected} region placeholders in the text but {found} in the encoded ids"
            )
