"""Samplers: evaluation batches of one task (TaskGroupedSampler), training batches of similar
length (LengthGroupedSampler); every record once per pass, across ranks."""

from __future__ import annotations

import itertools

import pytest
import torch

from groma_px.data.samplers import (
    LengthGroupedSampler,
    TaskGroupedSampler,
    length_grouped_order,
    record_length,
    task_grouped_order,
)
from groma_px.registry import DATA_SAMPLERS

TASKS = ["rec", "gcap", "count", "rec", "gcap", "count", "rec", None, "rec", "gcap"]


class _Records:
    def __init__(self, tasks):
        self.tasks = tasks

    def __len__(self):
        return len(self.tasks)

    def get_data_info(self, index):
        return {} if self.tasks[index] is None else {"task": self.tasks[index]}


def test_order_sorts_stably_within_windows():
    tasks = ["b", "a", "b", "a", "c", "a"]
    assert task_grouped_order(tasks, 0) == [1, 3, 5, 0, 2, 4]
    assert task_grouped_order(tasks, 3) == [1, 0, 2, 3, 5, 4]
    assert task_grouped_order(tasks, 1) == [0, 1, 2, 3, 4, 5]
    assert task_grouped_order([], 4) == []


def test_sampler_groups_tasks_and_keeps_every_record():
    sampler = DATA_SAMPLERS.build(
        dict(type="TaskGroupedSampler", window=5), default_args=dict(dataset=_Records(TASKS))
    )
    assert isinstance(sampler, TaskGroupedSampler)
    order = list(sampler)
    assert len(sampler) == len(order) == len(TASKS)
    assert sorted(order) == list(range(len(TASKS)))
    # window 1, records 0-4: count, gcap, gcap, rec, rec; window 2, records 5-9: "" first
    assert order == [2, 1, 4, 0, 3, 7, 5, 9, 6, 8]
    assert [TASKS[i] or "" for i in order] == [
        "count", "gcap", "gcap", "rec", "rec", "", "count", "gcap", "rec", "rec"
    ]  # fmt: skip


@pytest.mark.parametrize("round_up", [True, False])
def test_sampler_shards_like_default_sampler(monkeypatch, round_up):
    """Two ranks: each gets every other index of the grouped order; together every record
    (round_up pads with the first ones, as mmengine's DefaultSampler does)."""
    shards = []
    for rank in range(2):
        monkeypatch.setattr("mmengine.dataset.sampler.get_dist_info", lambda r=rank: (r, 2))
        shards.append(list(TaskGroupedSampler(_Records(TASKS[:9]), window=0, round_up=round_up)))
    order = task_grouped_order([t or "" for t in TASKS[:9]], 0)
    assert shards[0] == order[0::2]
    assert shards[1] == ((order + order[:1])[1::2] if round_up else order[1::2])
    assert len(shards[0]) == 5 and len(shards[1]) == (5 if round_up else 4)
    assert sorted(set(shards[0] + shards[1])) == list(range(9))


# ------------------------------------------------------------------------------ training
def _padding(order, lengths, batch):
    """Padded positions over real ones when batches are padded to their longest record."""
    chunks = [order[k : k + batch] for k in range(0, len(order), batch)]
    padded = sum(max(lengths[i] for i in c) * len(c) for c in chunks)
    return padded / sum(lengths[i] for c in chunks for i in c)


def test_length_grouped_order_sorts_groups_and_keeps_every_index():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(v) for v in torch.randint(5, 100, (64,), generator=generator)]
    drawn = torch.randperm(64, generator=generator).tolist()
    order = length_grouped_order(drawn, lengths, batch=4, megabatch=4, generator=generator)
    assert sorted(order) == list(range(64))
    for start in range(0, 64, 16):  # each group holds the same indices as drawn, longest first
        group = order[start : start + 16]
        assert set(group) == set(drawn[start : start + 16])
        chunks = sorted((group[k : k + 4] for k in range(0, 16, 4)), key=lambda c: -lengths[c[0]])
        flat = [lengths[i] for c in chunks for i in c]
        assert flat == sorted(flat, reverse=True)
    assert _padding(order, lengths, 4) < _padding(drawn, lengths, 4) - 0.1
    as_drawn = length_grouped_order(drawn, lengths, 4, 1, generator)  # megabatch 1: same batches
    assert [set(as_drawn[k : k + 4]) for k in range(0, 64, 4)] == [
        set(drawn[k : k + 4]) for k in range(0, 64, 4)
    ]


def test_length_grouped_sampler_passes_and_ranks(monkeypatch):
    records = _Conversations([3, 60, 5, 30, 62, 7, 32, 9, 64, 34, 66, 36])  # lengths in words
    stream = list(
        itertools.islice(iter(LengthGroupedSampler(records, batch_size=2, megabatch=6, seed=3)), 36)
    )
    for p in range(3):  # every record once per pass of 12
        assert sorted(stream[12 * p : 12 * p + 12]) == list(range(12))
    spread = [abs(records.words[a] - records.words[b]) for a, b in _chunks(stream, 2)]
    assert max(spread) == 2  # the two records of a batch are neighbours in length
    assert record_length(records.get_data_info(1)) == 60 + 2
    # Two ranks, batch 2 each: every global batch of 4 holds four neighbours in length.
    shards = []
    for rank in range(2):
        monkeypatch.setattr("mmengine.dataset.sampler.get_dist_info", lambda r=rank: (r, 2))
        sampler = LengthGroupedSampler(records, batch_size=2, megabatch=3, seed=3)
        shards.append(list(itertools.islice(iter(sampler), 12)))
    merged = [i for pair in zip(*shards, strict=True) for i in pair]
    assert sorted(merged[:12]) == list(range(12))
    for batch in _chunks(merged, 4):
        words = sorted(records.words[i] for i in batch)
        assert words[-1] - words[0] <= 6
    with pytest.raises(ValueError, match="batch_size and megabatch must be >= 1"):
        LengthGroupedSampler(records, batch_size=0)


class _Conversations:
    def __init__(self, words):
        self.words = words

    def __len__(self):
        return len(self.words)

    def get_data_info(self, index):
        turn = {"from": "gpt", "value": " ".join(["w"] * self.words[index])}
        return {"conversations": [turn], "regions": [{"box": [0, 0, 1, 1]}]}


def _chunks(seq, n):
    return [seq[k : k + n] for k in range(0, len(seq), n)]
