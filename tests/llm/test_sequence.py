"""Tests for the sequence expansion and collation of ``groma_px.llm.sequence``."""

from __future__ import annotations

import pytest
import torch

from groma_px.llm.sequence import (
    IGNORE_INDEX,
    LLMSequence,
    build_sequence,
    collate_sequences,
    positions_per_image,
    region_block_length,
)
from groma_px.llm.tokenizer import build_tokenizer
from groma_px.llm.vocab import GroundingTokenIds, GroundingVocab

# Hand-built ids: base tokens are small numbers, grounding tokens 100+, <ri> = 110 + i.
IDS = GroundingTokenIds(*range(100, 110), regions=tuple(range(110, 118)))
IMG, REG, RS, RE, PS, PE = 100, 101, 102, 103, 104, 105
REFER_BOX, GROUND_BOX, REFER_FEAT = 107, 108, 109
X = IGNORE_INDEX
G = 2  # image tokens


def r(i: int) -> int:
    """Id of ``<ri>``."""
    return 110 + i


def conversation() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Human: ``<s> <image> 5 <refer_feat> 6``; assistant: ``7 <p> 8 </p><roi><ground_box></roi>
    9 <refer_box> </s>``; placeholders cite kept regions 2, 0, 1."""
    human = [1, IMG, 5, REFER_FEAT, 6]
    answer = [7, PS, 8, PE, RS, GROUND_BOX, RE, 9, REFER_BOX, 2]
    ids = torch.tensor(human + answer)
    mask = torch.tensor([False] * len(human) + [True] * len(answer))
    return ids, mask, torch.tensor([2, 0, 1])


ANSWER_IDS = [7, PS, 8, PE, RS, r(0), RE, 9, r(1), 2]


def build(layout: str, num_regions: int = 3) -> LLMSequence:
    ids, mask, refs = conversation()
    return build_sequence(
        ids, mask, refs, ids=IDS, num_regions=num_regions, num_image_tokens=G, layout=layout
    )


def test_pair_layout_exact() -> None:
    seq = build("pair")
    block = [r(0), REG, r(1), REG, r(2), REG]
    assert seq.input_ids.tolist() == [1, IMG, IMG, *block, 5, r(2), REG, 6, *ANSWER_IDS]
    assert seq.labels.tolist() == [X] * 13 + ANSWER_IDS
    assert seq.image_slots.nonzero().flatten().tolist() == [1, 2]
    expected_slots = [-1] * len(seq)
    for pos, row in {4: 0, 6: 1, 8: 2, 11: 2}.items():
        expected_slots[pos] = row
    assert seq.region_slots.tolist() == expected_slots
    assert not seq.region_add.any()
    assert len(seq) == 15 + 1 + positions_per_image(G, 3, "pair") - 1


def test_fused_layout_exact() -> None:
    seq = build("fused")
    assert seq.input_ids.tolist() == [1, IMG, IMG, r(0), r(1), r(2), 5, r(2), REG, 6, *ANSWER_IDS]
    assert seq.labels.tolist() == [X] * 10 + ANSWER_IDS
    assert seq.image_slots.nonzero().flatten().tolist() == [1, 2]
    expected_slots = [-1] * len(seq)
    for pos, row in {3: 0, 4: 1, 5: 2, 8: 2}.items():
        expected_slots[pos] = row
    assert seq.region_slots.tolist() == expected_slots
    # The block's features are added; the <refer_feat> slot still replaces its <region>.
    assert seq.region_add.nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.parametrize("layout", ["pair", "fused"])
def test_labels_align_with_ids(layout: str) -> None:
    seq = build(layout)
    supervised = seq.labels != IGNORE_INDEX
    assert torch.equal(seq.labels[supervised], seq.input_ids[supervised])
    assert not (supervised & seq.image_slots).any()
    assert not (supervised & (seq.region_slots >= 0)).any()


def test_supervised_refer_feat_labels_index_not_slot() -> None:
    ids = torch.tensor([IMG, 5, REFER_FEAT, 6])
    mask = torch.tensor([False, True, True, True])
    seq = build_sequence(
        ids, mask, torch.tensor([1]), ids=IDS, num_regions=2, num_image_tokens=1, layout="fused"
    )
    assert seq.input_ids.tolist() == [IMG, r(0), r(1), 5, r(1), REG, 6]
    assert seq.labels.tolist() == [X, X, X, 5, r(1), X, 6]
    assert seq.region_slots.tolist() == [-1, 0, 1, -1, -1, 1, -1]
    assert seq.region_add.tolist() == [False, True, True, False, False, False, False]


def test_placeholders_on_both_sides_of_the_image_keep_their_order() -> None:
    ids = torch.tensor([REFER_BOX, IMG, REFER_FEAT, GROUND_BOX])
    mask = torch.zeros(4, dtype=torch.bool)
    seq = build_sequence(
        ids, mask, torch.tensor([3, 1, 0]), ids=IDS, num_regions=4, num_image_tokens=1
    )
    block = [r(0), REG, r(1), REG, r(2), REG, r(3), REG]
    assert seq.input_ids.tolist() == [r(3), IMG, *block, r(1), REG, r(0)]
    assert seq.region_slots.tolist()[-3:] == [-1, 1, -1]


def test_zero_regions_and_no_image() -> None:
    ids = torch.tensor([1, IMG, 5])
    mask = torch.tensor([False, False, True])
    seq = build_sequence(
        ids, mask, torch.zeros(0, dtype=torch.long), ids=IDS, num_regions=0, num_image_tokens=3
    )
    assert seq.input_ids.tolist() == [1, IMG, IMG, IMG, 5]
    assert seq.region_slots.tolist() == [-1] * 5
    text = build_sequence(
        torch.tensor([1, 5, 2]),
        torch.tensor([False, True, True]),
        torch.zeros(0, dtype=torch.long),
        ids=IDS,
        num_regions=0,
        num_image_tokens=3,
    )
    assert text.input_ids.tolist() == [1, 5, 2]
    assert text.labels.tolist() == [X, 5, 2]
    assert not text.image_slots.any()


def test_sizes() -> None:
    assert region_block_length(100, "pair") == 200
    assert region_block_length(100, "fused") == 100
    assert positions_per_image(64, 100, "pair") == 264
    assert positions_per_image(64, 100, "fused") == 164
    with pytest.raises(ValueError, match="layout"):
        region_block_length(3, "interleaved")
    with pytest.raises(ValueError, match="num_image_tokens"):
        positions_per_image(0, 3, "pair")


def _build_with(**overrides: object) -> LLMSequence:
    ids, mask, refs = conversation()
    kwargs: dict = dict(ids=IDS, num_regions=3, num_image_tokens=G, layout="pair")
    args = {"input_ids": ids, "label_mask": mask, "ref_to_region": refs}
    for key in list(overrides):
        if key in args:
            args[key] = overrides.pop(key)
    kwargs.update(overrides)
    return build_sequence(args["input_ids"], args["label_mask"], args["ref_to_region"], **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ref_to_region": torch.tensor([2, 0])}, "sample cites 3 boxes but has 2"),
        ({"ref_to_region": torch.tensor([2, 0, 1, 1])}, "sample cites 3 boxes but has 4"),
        ({"ref_to_region": torch.tensor([2, 0, 3])}, r"outside \[0, num_regions=3\)"),
        ({"ref_to_region": torch.tensor([2, -1, 0])}, "outside"),
        ({"num_regions": 9}, "more regions than region tokens"),
        (
            {
                "input_ids": torch.tensor([IMG, IMG, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
                "ref_to_region": torch.zeros(0, dtype=torch.long),
            },
            "2 <image>",
        ),
        ({"input_ids": conversation()[0].int()}, "input_ids must be 1-D torch.int64"),
        ({"label_mask": conversation()[1].long()}, "label_mask must be 1-D torch.bool"),
        ({"label_mask": torch.ones(3, dtype=torch.bool)}, "label_mask has shape"),
        ({"input_ids": conversation()[0][None]}, "got shape \\(1, 15\\)"),
        ({"ref_to_region": torch.tensor([2.0, 0.0, 1.0])}, "ref_to_region must be"),
        ({"layout": "interleaved"}, "layout"),
        ({"num_regions": -1}, "num_regions"),
    ],
)
def test_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build_with(**overrides)


def test_citations_without_image_raise() -> None:
    no_refs = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no <image>"):
        build_sequence(
            torch.tensor([1, REFER_BOX]),
            torch.tensor([False, True]),
            torch.tensor([0]),
            ids=IDS,
            num_regions=1,
            num_image_tokens=G,
        )
    with pytest.raises(ValueError, match="no <image>"):
        build_sequence(
            torch.tensor([1, 5]),
            torch.tensor([False, True]),
            no_refs,
            ids=IDS,
            num_regions=2,
            num_image_tokens=G,
        )


def test_literal_region_tokens() -> None:
    no_refs = torch.zeros(0, dtype=torch.long)
    mask = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="literal <region>"):
        build_sequence(
            torch.tensor([IMG, REG, 5]), mask, no_refs, ids=IDS, num_regions=1, num_image_tokens=G
        )
    with pytest.raises(ValueError, match="i >= num_regions=2"):
        build_sequence(
            torch.tensor([IMG, r(2), 5]), mask, no_refs, ids=IDS, num_regions=2, num_image_tokens=G
        )
    kept = build_sequence(
        torch.tensor([IMG, r(1), 5]),
        mask,
        no_refs,
        ids=IDS,
        num_regions=2,
        num_image_tokens=1,
        layout="fused",
    )
    assert kept.input_ids.tolist() == [IMG, r(0), r(1), r(1), 5]


def test_llm_sequence_checks_its_fields() -> None:
    seq = build("pair")
    with pytest.raises(ValueError, match="region_slots has shape"):
        LLMSequence(
            seq.input_ids, seq.labels, seq.image_slots, seq.region_slots[1:], seq.region_add
        )
    with pytest.raises(ValueError, match="region_add is True where region_slots is -1"):
        LLMSequence(
            seq.input_ids,
            seq.labels,
            seq.image_slots,
            seq.region_slots,
            torch.ones_like(seq.region_add),
        )


def _short_and_long() -> tuple[LLMSequence, LLMSequence]:
    long_seq = build("fused")
    ids = torch.tensor([IMG, 5])
    short = build_sequence(
        ids,
        torch.tensor([False, True]),
        torch.zeros(0, dtype=torch.long),
        ids=IDS,
        num_regions=1,
        num_image_tokens=1,
        layout="fused",
    )
    return short, long_seq


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads(side: str) -> None:
    short, long_seq = _short_and_long()
    batch = collate_sequences([short, long_seq], pad_token_id=0, padding_side=side)
    length = len(long_seq)
    assert list(batch) == [
        "input_ids",
        "labels",
        "attention_mask",
        "image_slots",
        "region_slots",
        "region_add",
    ]
    for value in batch.values():
        assert value.shape == (2, length)
    assert batch["attention_mask"].dtype == torch.long
    pad = length - len(short)
    real = slice(0, len(short)) if side == "right" else slice(pad, length)
    padding = slice(len(short), length) if side == "right" else slice(0, pad)
    assert batch["input_ids"][0, real].tolist() == [IMG, r(0), 5]
    assert batch["input_ids"][0, padding].tolist() == [0] * pad
    assert batch["labels"][0, padding].tolist() == [X] * pad
    assert batch["attention_mask"][0].tolist()[real] == [1] * len(short)
    assert batch["attention_mask"][0].sum() == len(short)
    assert batch["region_slots"][0, real].tolist() == [-1, 0, -1]
    assert batch["region_slots"][0, padding].tolist() == [-1] * pad
    assert not batch["image_slots"][0, padding].any() and not batch["region_add"][0, padding].any()
    assert batch["attention_mask"][1].tolist() == [1] * length
    assert torch.equal(batch["labels"][1], long_seq.labels)
    # Image slots in row-major order: sample 0's G features, then sample 1's.
    assert batch["image_slots"].sum() == 1 + G


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate_sequences([], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        collate_sequences([build("pair")], pad_token_id=0, padding_side="middle")


def test_with_a_real_tokenizer() -> None:
    vocab = GroundingVocab(4)
    tokenizer = build_tokenizer(
        ["where is the red circle", "the red circle"] * 4, vocab=vocab, vocab_size=300
    )
    ids = vocab.token_ids(tokenizer)
    human = tokenizer("<image>\nwhere is <refer_feat>?", add_special_tokens=False).input_ids
    answer = tokenizer(
        "<p>the red circle</p><roi><ground_box></roi>", add_special_tokens=False
    ).input_ids
    seq = build_sequence(
        torch.tensor(human + answer),
        torch.tensor([False] * len(human) + [True] * len(answer)),
        torch.tensor([1, 0]),
        ids=ids,
        num_regions=2,
        num_image_tokens=2,
    )
    assert tokenizer.decode(seq.input_ids) == (
        "<image><image><r0><region><r1><region>\nwhere is <r1><region>?"
        "<p>the red circle</p><roi><r0></roi>"
    )
    supervised = seq.labels[seq.labels != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "<p>the red circle</p><roi><r0></roi>"
