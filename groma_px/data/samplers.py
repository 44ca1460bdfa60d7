"""Evaluation order: batches of one task, so that generation stops early.

Greedy generation runs a batch until its longest answer ends. The test split lists each image's
records together (a referring question of 5-15 tokens, a count, a grounded caption of 50-95
tokens...), so in file order nearly every batch of 32 held a grounded caption and decoded to
``max_new_tokens``. Grouping records by task within windows of the file order lets most batches
stop after a few tokens. Each window still covers a bounded set of images, so the model's
memory of recently perceived images (``GromaPX(recent_images=...)``) computes each image once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from mmengine.dataset import DefaultSampler

from ..registry import DATA_SAMPLERS


@DATA_SAMPLERS.register_module()
class TaskGroupedSampler(DefaultSampler):
    """``DefaultSampler`` (no shuffling) whose order groups records by task.

    The file order is cut into windows of ``window`` records; within a window the records are
    stably sorted by their ``task`` field (records without one count as task ``""``). Sharding
    across ranks, ``round_up`` and the dataset length are ``DefaultSampler``'s, so distributed
    evaluation sees every record once. Metrics that aggregate over records do
    not depend on the order.

    Args:
        dataset: Dataset whose ``get_data_info(i)`` returns a dict (``task`` read if present).
        window: Records per window. Defaults to 1024 (about 90 images of the synthetic test
            split); 0 or less sorts the whole dataset as one window.
        round_up: As ``DefaultSampler``. Defaults to True.
        seed: As ``DefaultSampler`` (unused: no shuffling).
    """

    def __init__(
        self, dataset: Sized, *, window: int = 1024, round_up: bool = True, seed: Any = None
    ) -> None:
        super().__init__(dataset, shuffle=False, seed=seed, round_up=round_up)
        self.window = int(window)
        self.order = task_grouped_order(
            [_task(dataset, i) for i in range(len(dataset))], self.window
        )

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order)
        if self.round_up:
            indices = (indices * int(self.total_size / len(indices) + 1))[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.world_size])


def task_grouped_order(tasks: list[str], window: int) -> list[int]:
    """Indices ``0..len(tasks)-1``, stably sorted by task within consecutive windows."""
    n = len(tasks)
    size = n if window <= 0 else window
    order: list[int] = []
    for start in range(0, n, max(size, 1)):
        block = range(start, min(start + size, n))
        order.extend(sorted(block, key=lambda i: tasks[i]))
    return order


def _task(dataset: Any, index: int) -> str:
    info = dataset.get_data_info(index) if hasattr(dataset, "get_data_info") else None
    task = info.get("task") if isinstance(info, dict) else None
    return str(task) if task is not None else ""
