"""ConversationTemplate: role layout, supervision mask, single-id placeholders, generation."""

import copy

import pytest

from groma_px.data.templates import (
    TEMPLATE_NAMES,
    VICUNA_SYSTEM,
    ConversationError,
    ConversationTemplate,
)
from groma_px.llm.tokenizer import build_tokenizer
from groma_px.llm.vocab import GroundingVocab

VOCAB = GroundingVocab(8)
TURNS = [
    {"from": "human", "value": "<image>\nWhat is in <roi><refer_box></roi>?", "regions": [1]},
    {"from": "gpt", "value": "a large red circle"},
    {"from": "human", "value": "[grounding] Where is the blue square?"},
    {"from": "gpt", "value": "<p>the blue square</p><roi><ground_box></roi>", "regions": [0]},
]
# Jinja as Hugging Face renders it (trim_blocks: the newline after a block tag is dropped).
CHAT_JINJA = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [t["value"] for t in TURNS] * 4
    return build_tokenizer(corpus, vocab=VOCAB, vocab_size=300)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_JINJA
    return chat


def supervised_runs(tokenizer, encoded):
    """Decoded text of each contiguous run of supervised ids."""
    runs, current = [], []
    for token_id, supervised in zip(encoded.input_ids, encoded.label_mask, strict=True):
        if supervised:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", ["groma", "llava", "default"])
def test_vicuna_layout_and_mask(tokenizer, name):
    encoded = ConversationTemplate(name).encode(TURNS, tokenizer)
    expected = (
        f"<s>{VICUNA_SYSTEM} USER: {TURNS[0]['value']} ASSISTANT: {TURNS[1]['value']}</s>"
        f"USER: {TURNS[2]['value']} ASSISTANT: {TURNS[3]['value']}</s>"
    )
    assert tokenizer.decode(encoded.input_ids) == expected
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    # The separator space is part of the answer's first token, as in Vicuna's tokenisation.
    assert supervised_runs(tokenizer, encoded) == [
        f" {TURNS[1]['value']}</s>",
        f" {TURNS[3]['value']}</s>",
    ]
    assert encoded.label_mask[-1] and encoded.input_ids[-1] == tokenizer.eos_token_id


def test_plain_is_short_and_has_no_system(tokenizer):
    plain = ConversationTemplate("plain").encode(TURNS, tokenizer)
    groma = ConversationTemplate("groma").encode(TURNS, tokenizer)
    text = tokenizer.decode(plain.input_ids)
    assert text == (
        f"<s>Q: {TURNS[0]['value']} A: {TURNS[1]['value']}</s>"
        f"Q: {TURNS[2]['value']} A: {TURNS[3]['value']}</s>"
    )
    assert len(plain.input_ids) < len(groma.input_ids)
    assert supervised_runs(tokenizer, plain) == supervised_runs(tokenizer, groma)


def test_system_override(tokenizer):
    encoded = ConversationTemplate("groma", system="Be brief.").encode(TURNS[:2], tokenizer)
    assert tokenizer.decode(encoded.input_ids).startswith("<s>Be brief. USER: <image>")


def test_placeholders_and_grounding_tokens_are_single_ids(tokenizer):
    ids = VOCAB.token_ids(tokenizer)
    encoded = ConversationTemplate("groma").encode(TURNS, tokenizer)
    for token_id in (ids.image, ids.refer_box, ids.ground_box, ids.grounding):
        assert encoded.input_ids.count(token_id) == 1
    assert encoded.input_ids.count(ids.roi_start) == 2
    assert encoded.placeholder_turns == [0, 3]


def test_for_generation_is_the_training_prefix_without_the_answer(tokenizer):
    template = ConversationTemplate("groma")
    train = template.encode(TURNS, tokenizer)
    gen = template.encode(TURNS, tokenizer, for_generation=True)
    assert gen.input_ids == train.input_ids[: len(gen.input_ids)]
    text = tokenizer.decode(gen.input_ids)
    assert text.endswith(f"USER: {TURNS[2]['value']} ASSISTANT:")
    assert "the blue square</p>" not in text
    assert not any(gen.label_mask)
    assert gen.placeholder_turns == [0]


def test_for_generation_after_a_human_turn(tokenizer):
    gen = ConversationTemplate("plain").encode(TURNS[:3], tokenizer, for_generation=True)
    assert tokenizer.decode(gen.input_ids).endswith(f"Q: {TURNS[2]['value']} A:")
    assert not any(gen.label_mask)


def test_chat_template_mask_and_generation(chat_tokenizer):
    template = ConversationTemplate("chat_template")
    train = template.encode(TURNS, chat_tokenizer)
    assert chat_tokenizer.decode(train.input_ids) == chat_tokenizer.apply_chat_template(
        [
            {"role": r, "content": t["value"]}
            for r, t in zip(["user", "assistant"] * 2, TURNS, strict=True)
        ],
        tokenize=False,
    )
    answers = [f"{TURNS[1]['value']}</s>", f"{TURNS[3]['value']}</s>"]
    assert supervised_runs(chat_tokenizer, train) == answers
    assert train.placeholder_turns == [0, 3]
    gen = template.encode(TURNS, chat_tokenizer, for_generation=True)
    assert gen.input_ids == train.input_ids[: len(gen.input_ids)]
    assert chat_tokenizer.decode(gen.input_ids).endswith("<|assistant|>\n")
    assert not any(gen.label_mask) and gen.placeholder_turns == [0]


def test_chat_template_system_message(chat_tokenizer):
    encoded = ConversationTemplate("chat_template", system="Be brief.").encode(
        TURNS[:2], chat_tokenizer
    )
    assert chat_tokenizer.decode(encoded.input_ids).startswith("<|system|>\nBe brief.<|user|>")
    assert supervised_runs(chat_tokenizer, encoded) == [f"{TURNS[1]['value']}</s>"]


def test_chat_template_missing_raises(tokenizer):
    with pytest.raises(ValueError, match="chat_template"):
        ConversationTemplate("chat_template").encode(TURNS, tokenizer)


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ([TURNS[1], TURNS[0]], r"conversations\[0\]: expected from='human'"),
        ([TURNS[0], TURNS[2]], r"conversations\[1\]: expected from='gpt'"),
        (TURNS[:3], r"conversations\[2\]: a training conversation must end"),
        ([], r"conversations\[0\]: the conversation has no turns"),
    ],
)
def test_bad_turns_name_the_turn(tokenizer, turns, match):
    with pytest.raises(ConversationError, match=match):
        ConversationTemplate("groma").encode(turns, tokenizer)


def test_placeholder_in_system_prompt_is_caught(tokenizer):
    with pytest.raises(ConversationError, match=r"conversations\[0\]: 1 region placeholders"):
        ConversationTemplate("groma", system="<ground_box>").encode(TURNS, tokenizer)


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match="known") as info:
        ConversationTemplate("vicuna_v9")
    assert all(name in str(info.value) for name in TEMPLATE_NAMES)
