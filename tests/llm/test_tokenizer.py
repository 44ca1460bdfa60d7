"""Tests for the byte-level BPE tokenizer builder ``groma_px.llm.tokenizer`` and its CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from groma_px.data import schema
from groma_px.llm.tokenizer import (
    BASE_SPECIAL_TOKENS,
    MIN_VOCAB_SIZE,
    build_tokenizer,
    build_tokenizer_from_jsonl,
    iter_corpus,
    split_on_tokens,
)
from groma_px.llm.vocab import GroundingVocab

REPO_ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
ROUND_TRIP_TEXTS = [
    "<p>the red circle</p><roi><r3></roi>",
    " <p> two  blue squares </p> <roi><r0><r1></roi>\n",
    "<image>\n[grounding] Where is the small red circle?",
    "What is in <region>? Answer: a circle at<refer_box>,<ground_box> <refer_feat>.",
    "héllo 世界 🙂 <s>a</s><pad><unk> \t<r7>\r\n",
    "<p><p></p></p><roi></roi>",
]


def make_records(num_records: int, seed: int = 0) -> list[dict]:
    """Schema-format records of a tiny synthetic grounding corpus."""
    rng = random.Random(seed)
    records = []
    for i in range(num_records):
        phrase = f"the {rng.choice(['small', 'large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        records.append(
            {
                "id": f"toy/{i}",
                "image": f"images/{i:06d}.png",
                "height": 48,
                "width": 64,
                "task": "rec",
                "source": "toy",
                "regions": [{"box": [1, 2, 30, 40], "category": "circle"}],
                "conversations": [
                    {
                        "from": schema.HUMAN,
                        "value": f"{schema.IMAGE_PLACEHOLDER}\n[grounding] Where is {phrase}?",
                    },
                    {
                        "from": schema.ASSISTANT,
                        "value": f"<p>{phrase}</p><roi>{schema.GROUND_BOX}</roi>",
                        "regions": [0],
                    },
                ],
            }
        )
    return records


def corpus_texts(num_records: int = 200) -> list[str]:
    return [turn["value"] for r in make_records(num_records) for turn in r["conversations"]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vocab() -> GroundingVocab:
    return GroundingVocab(num_region_tokens=8)


@pytest.fixture(scope="module")
def tokenizer(vocab: GroundingVocab) -> PreTrainedTokenizerFast:
    return build_tokenizer(corpus_texts(), vocab=vocab, vocab_size=400)


def test_layout_base_then_grounding_tokens(
    tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab
) -> None:
    assert tokenizer.convert_tokens_to_ids(list(BASE_SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert (
        tokenizer.unk_token,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    ) == BASE_SPECIAL_TOKENS
    assert MIN_VOCAB_SIZE < tokenizer.vocab_size <= 400
    assert len(tokenizer) == tokenizer.vocab_size + len(vocab.special_tokens)
    ids = vocab.token_ids(tokenizer)
    start = tokenizer.vocab_size
    assert list(ids.all_ids) == list(range(start, start + len(vocab.special_tokens)))


def test_every_special_token_is_one_id_and_round_trips(
    tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab
) -> None:
    for token in BASE_SPECIAL_TOKENS + vocab.special_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
        assert tokenizer.decode([token_id], skip_special_tokens=False) == token


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_grounded_text_round_trips(
    tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab, text: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    special_ids = set(vocab.token_ids(tokenizer).all_ids)
    for token in vocab.special_tokens:
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token)
    assert sum(i in special_ids for i in ids) == sum(text.count(t) for t in vocab.special_tokens)


def test_answer_ids_and_skip_special(
    tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab
) -> None:
    ids = vocab.token_ids(tokenizer)
    encoded = tokenizer.encode("<p>the red circle</p><roi><r3></roi>", add_special_tokens=False)
    assert encoded[0] == ids.phrase_start
    assert encoded[-3:] == [ids.roi_start, ids.regions[3], ids.roi_end]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "the red circle"
    assert tokenizer.encode("a b", add_special_tokens=True) == tokenizer.encode(
        "a b", add_special_tokens=False
    )


def test_no_merge_spells_a_special_token(
    tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab
) -> None:
    base_tokens = [
        t
        for t, i in tokenizer.get_vocab().items()
        if i >= len(BASE_SPECIAL_TOKENS) and i < tokenizer.vocab_size
    ]
    for special in BASE_SPECIAL_TOKENS + vocab.special_tokens:
        assert not any(special in t for t in base_tokens), special
    assert any(t == "Ġcircle" for t in base_tokens)  # the corpus words did become merges


def test_k_changes_token_count() -> None:
    texts = corpus_texts(50)
    small = build_tokenizer(texts, vocab=GroundingVocab(8), vocab_size=300)
    large = build_tokenizer(texts, vocab=GroundingVocab(100), vocab_size=300)
    assert small.vocab_size == large.vocab_size
    assert len(large) - len(small) == 92
    assert GroundingVocab(100).token_ids(large).regions[99] == len(large) - 1


def test_build_is_deterministic(tmp_path: Path, vocab: GroundingVocab) -> None:
    texts = corpus_texts()
    first = build_tokenizer(texts, vocab=vocab, vocab_size=400)
    second = build_tokenizer(texts, vocab=vocab, vocab_size=400)
    shuffled = build_tokenizer(texts[::-1], vocab=vocab, vocab_size=400)
    for name, tok in (("a", first), ("b", second), ("c", shuffled)):
        tok.save_pretrained(str(tmp_path / name))
    files = [(tmp_path / name / "tokenizer.json").read_bytes() for name in "abc"]
    assert files[0] == files[1] == files[2]


def test_save_and_load_with_auto_tokenizer(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, vocab: GroundingVocab
) -> None:
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tokenizer)
    assert vocab.token_ids(loaded) == vocab.token_ids(tokenizer)
    assert vocab.add_to_tokenizer(loaded) == 0
    for text in ROUND_TRIP_TEXTS:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert loaded.decode(ids, skip_special_tokens=False) == text


def test_iter_corpus_reads_every_turn(tmp_path: Path) -> None:
    records = make_records(3)
    a = write_jsonl(tmp_path / "a.jsonl", records[:2])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(records[2]) + "\n\n", encoding="utf-8")
    expected = [turn["value"] for r in records for turn in r["conversations"]]
    assert list(iter_corpus([a, str(b)])) == expected


@pytest.mark.parametrize("line", ["{not json", '{"id": "x"}', '{"conversations": [{"from": 1}]}'])
def test_iter_corpus_reports_file_and_line(tmp_path: Path, line: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", make_records(1))
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(iter_corpus([path]))


def test_split_on_tokens_prefers_longest() -> None:
    pieces = list(split_on_tokens(["a<r1>b<r10>c<p>", "", "<p>"], ["<r1>", "<r10>", "<p>"]))
    assert pieces == ["a", "b", "c"]
    assert list(split_on_tokens(["x", ""], [])) == ["x"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab_size": MIN_VOCAB_SIZE - 1}, "vocab_size"), ({"min_frequency": 0}, "min_frequency")],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_tokenizer(["a"], vocab=GroundingVocab(8), **kwargs)


def test_cli_builds_loadable_and_matching_tokenizer(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "toy.jsonl", make_records(40))
    out = tmp_path / "cli_tok"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "build_tokenizer.py"),
            "--jsonl",
            str(jsonl),
            "--out",
            str(out),
            "--vocab-size",
            "320",
            "--num-region-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "vocab size:" in result.stdout and "<r0>" in result.stdout
    loaded = AutoTokenizer.from_pretrained(str(out))
    GroundingVocab(8).token_ids(loaded)
    # Same corpus built in this process: byte-identical across processes.
    in_process = build_tokenizer_from_jsonl(
        [jsonl], tmp_path / "lib_tok", vocab=GroundingVocab(8), vocab_size=320
    )
    assert len(in_process) == len(loaded)
    cli_bytes = (out / "tokenizer.json").read_bytes()
    assert cli_bytes == (tmp_path / "lib_tok" / "tokenizer.json").read_bytes()
