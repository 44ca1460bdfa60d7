"""TaskGroupedSampler: evaluation batches of one task, every record once across ranks."""

from __future__ import annotations

import pytest

from groma_px.data.samplers import TaskGroupedSampler, task_grouped_order
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
