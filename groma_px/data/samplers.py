"""Sample orders: evaluation batches of one task, training batches of similar length.

Greedy generation runs a batch until its longest answer ends. The test split lists each image's
records together (a referring question of 5-15 tokens, a count, a grounded caption of 50-95
tokens...), so in file order nearly every batch of 32 held a grounded caption and decoded to
``max_new_tokens``. Grouping records by task within windows of the file order lets most batches
stop after a few tokens. Each window still covers a bounded set of images, so the model's
memory of recently perceived images (``GromaPX(recent_images=...)``) computes each image once.

In training, the LLM runs on batches padded to their longest sequence; in file order 41 % of the
positions of a stage-3 batch were padding. ``LengthGroupedSampler`` (LLaVA's
``group_by_modality_length`` idea) shuffles as usual, then sorts each group of a few batches by
record length, so a batch holds records of similar length. It is opt-in: on the synthetic chat
stages it cut stage-3 time but cost relational REC (docs/NOTES.md, "Faster evaluation").
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from mmengine.dataset import DefaultSampler, InfiniteSampler

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


@DATA_SAMPLERS.register_module()
class LengthGroupedSampler(InfiniteSampler):
    """``InfiniteSampler`` whose batches hold records of similar length.

    Each pass draws a random permutation (as ``InfiniteSampler``), cuts it into groups of
    ``megabatch`` global batches (``batch_size`` x world size records), sorts each group by
    record length (:func:`record_length`) and shuffles the order of the group's batches. Every
    record is seen once per pass (a pass is topped up to whole global batches with its first
    records); only which records share a batch changes. Ranks take
    every world-size-th index, so each rank's batches stay grouped.

    Args:
        dataset: Dataset whose ``get_data_info(i)`` returns a record dict.
        batch_size: Per-rank batch size of the data loader.
        megabatch: Batches per sorted group. Defaults to 8; 1 leaves batches as drawn
            (``InfiniteSampler``'s order).
        shuffle: As ``InfiniteSampler``. Defaults to True.
        seed: As ``InfiniteSampler``.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        batch_size: int,
        megabatch: int = 8,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> None:
        if batch_size < 1 or megabatch < 1:
            raise ValueError(
                f"LengthGroupedSampler: batch_size and megabatch must be >= 1, got "
                f"{batch_size} and {megabatch}"
            )
        self.batch_size = int(batch_size)
        self.megabatch = int(megabatch)
        self.lengths = [
            record_length(dataset.get_data_info(i)) if hasattr(dataset, "get_data_info") else 0
            for i in range(len(dataset))
        ]
        super().__init__(dataset, shuffle=shuffle, seed=seed)

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        step = self.batch_size * self.world_size
        while True:
            if self.shuffle:
                order = torch.randperm(self.size, generator=generator).tolist()
            else:
                order = list(range(self.size))
            # Whole batches per pass (the first records repeat), so that batches stay aligned
            # with the sorted chunks from one pass to the next.
            order += order[: -len(order) % step]
            yield from length_grouped_order(order, self.lengths, step, self.megabatch, generator)


def length_grouped_order(
    order: list[int],
    lengths: list[int],
    batch: int,
    megabatch: int,
    generator: torch.Generator,
) -> list[int]:
    """``order`` regrouped: each run of ``batch * megabatch`` indices sorted by length
    (longest first, ties in drawn order), its ``batch``-sized chunks in a random order."""
    out: list[int] = []
    group = batch * megabatch
    for start in range(0, len(order), group):
        ranked = sorted(order[start : start + group], key=lambda i: -lengths[i])
        chunks = [ranked[k : k + batch] for k in range(0, len(ranked), batch)]
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            out.extend(chunks[c])
    return out


def record_length(info: Any) -> int:
    """A record's length proxy: words over its conversation turns plus two per region (a region
    block is two LLM positions; the kept proposals of an image grow with its objects)."""
    if not isinstance(info, dict):
        return 0
    words = sum(len(str(turn.get("value", "")).split()) for turn in info.get("conversations", ()))
    return words + 2 * len(info.get("regions", ()))
