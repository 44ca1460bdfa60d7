"""Tests for the grounding-token registry ``groma_px.llm.vocab``."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from groma_px.data import schema
from groma_px.llm.vocab import FIXED_TOKENS, GroundingTokenIds, GroundingVocab

TINY_CORPUS = ["the red circle", "a blue square", "two green triangles", "where is the circle?"] * 4


def bare_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE built here from a tiny corpus, without any grounding token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", clean_up_tokenization_spaces=False
    )


@pytest.mark.parametrize("k", [1, 8, 100])
def test_token_count_follows_k(k: int) -> None:
    vocab = GroundingVocab(num_region_tokens=k)
    assert vocab.region_tokens == tuple(f"<r{i}>" for i in range(k))
    assert len(vocab.special_tokens) == len(FIXED_TOKENS) + k
    assert len(set(vocab.special_tokens)) == len(vocab.special_tokens)
    assert vocab.special_tokens[: len(FIXED_TOKENS)] == FIXED_TOKENS


def test_default_k_and_stable_order() -> None:
    assert GroundingVocab().num_region_tokens == 100
    assert GroundingVocab().special_tokens == GroundingVocab(100).special_tokens
    expected = {
        "<region>",
        "<roi>",
        "</roi>",
        "<p>",
        "</p>",
        "[grounding]",
        schema.IMAGE_PLACEHOLDER,
        *schema.REGION_PLACEHOLDERS,
    }
    assert set(FIXED_TOKENS) == expected


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "8"])
def test_invalid_k_raises(k: object) -> None:
    with pytest.raises(ValueError, match="num_region_tokens"):
        GroundingVocab(num_region_tokens=k)  # type: ignore[arg-type]


def test_region_token_range_checked() -> None:
    vocab = GroundingVocab(num_region_tokens=8)
    assert vocab.region_token(0) == "<r0>"
    assert vocab.region_token(7) == "<r7>"
    for bad in (8, -1, 100):
        with pytest.raises(IndexError, match=r"num_region_tokens=8"):
            vocab.region_token(bad)
    with pytest.raises(TypeError):
        vocab.region_token(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("<r0>", 0),
        ("<r3>", 3),
        ("<r99>", 99),
        ("<r100>", None),
        ("<r03>", None),
        ("<r-1>", None),
        ("<p>", None),
        ("r3", None),
        (" <r3>", None),
        ("<r3> ", None),
        ("<region>", None),
    ],
)
def test_parse_region_index(token: str, expected: int | None) -> None:
    assert GroundingVocab(num_region_tokens=100).parse_region_index(token) == expected


def test_parse_region_index_inverts_region_token() -> None:
    vocab = GroundingVocab(num_region_tokens=12)
    assert [vocab.parse_region_index(vocab.region_token(i)) for i in range(12)] == list(range(12))


def test_add_to_tokenizer_on_bare_tokenizer_and_idempotent() -> None:
    tokenizer = bare_tokenizer()
    vocab = GroundingVocab(num_region_tokens=8)
    size = len(tokenizer)
    assert vocab.add_to_tokenizer(tokenizer) == len(vocab.special_tokens)
    assert len(tokenizer) == size + len(vocab.special_tokens)
    assert vocab.add_to_tokenizer(tokenizer) == 0
    assert len(tokenizer) == size + len(vocab.special_tokens)


def test_add_to_tokenizer_keeps_existing_extra_special_tokens() -> None:
    tokenizer = bare_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<custom>"]})
    GroundingVocab(num_region_tokens=8).add_to_tokenizer(tokenizer)
    extras = [str(t) for t in tokenizer.extra_special_tokens]
    assert "<custom>" in extras
    assert set(GroundingVocab(num_region_tokens=8).special_tokens) <= set(extras)


def test_growing_k_adds_only_new_region_tokens() -> None:
    tokenizer = bare_tokenizer()
    GroundingVocab(num_region_tokens=8).add_to_tokenizer(tokenizer)
    small = GroundingVocab(num_region_tokens=8).token_ids(tokenizer)
    assert GroundingVocab(num_region_tokens=100).add_to_tokenizer(tokenizer) == 92
    large = GroundingVocab(num_region_tokens=100).token_ids(tokenizer)
    assert large.regions[:8] == small.regions
    assert large.fixed == small.fixed


def test_token_ids_come_from_convert_tokens_to_ids_and_are_distinct() -> None:
    tokenizer = bare_tokenizer()
    vocab = GroundingVocab(num_region_tokens=8)
    vocab.add_to_tokenizer(tokenizer)
    ids = vocab.token_ids(tokenizer)
    assert isinstance(ids, GroundingTokenIds)
    assert list(ids.all_ids) == tokenizer.convert_tokens_to_ids(list(vocab.special_tokens))
    assert len(set(ids.all_ids)) == len(vocab.special_tokens)
    assert ids.num_region_tokens == 8
    assert ids.image == tokenizer.convert_tokens_to_ids(schema.IMAGE_PLACEHOLDER)
    assert ids.ground_box == tokenizer.convert_tokens_to_ids(schema.GROUND_BOX)
    assert ids.phrase_start == tokenizer.convert_tokens_to_ids("<p>")
    assert [ids.region_index(t) for t in ids.regions] == list(range(8))
    assert ids.region_index(ids.image) is None
    assert ids == vocab.token_ids(tokenizer)


def test_every_token_encodes_to_one_id_and_round_trips() -> None:
    tokenizer = bare_tokenizer()
    vocab = GroundingVocab(num_region_tokens=8)
    vocab.add_to_tokenizer(tokenizer)
    ids = vocab.token_ids(tokenizer)
    for token, token_id in zip(vocab.special_tokens, ids.all_ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert tokenizer.decode([token_id], skip_special_tokens=False) == token


def test_grounded_answer_round_trips_on_added_tokenizer() -> None:
    tokenizer = bare_tokenizer()
    vocab = GroundingVocab(num_region_tokens=8)
    vocab.add_to_tokenizer(tokenizer)
    ids = vocab.token_ids(tokenizer)
    text = "<p>the red circle</p><roi><r3></roi> and <p> a square </p> <roi><r7></roi>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(encoded, skip_special_tokens=False) == text
    assert encoded.count(ids.regions[3]) == 1
    assert encoded.count(ids.roi_start) == 2


def test_token_ids_names_the_missing_token() -> None:
    with pytest.raises(KeyError, match=r"'<image>'.*add_to_tokenizer"):
        GroundingVocab(num_region_tokens=8).token_ids(bare_tokenizer())
    tokenizer = bare_tokenizer()
    GroundingVocab(num_region_tokens=8).add_to_tokenizer(tokenizer)
    with pytest.raises(KeyError, match=r"'<r8>'"):
        GroundingVocab(num_region_tokens=9).token_ids(tokenizer)


def test_token_in_base_vocab_only_is_rejected_then_registered_in_place() -> None:
    base = {"<unk>": 0, "<image>": 1, "hello": 2}
    backend = Tokenizer(models.WordLevel(vocab=base, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    vocab = GroundingVocab(num_region_tokens=2)
    with pytest.raises(KeyError, match=r"'<image>'.*not an added token"):
        vocab.token_ids(tokenizer)
    assert vocab.add_to_tokenizer(tokenizer) == len(vocab.special_tokens) - 1
    assert vocab.token_ids(tokenizer).image == 1
