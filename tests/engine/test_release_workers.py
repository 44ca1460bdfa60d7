"""``release_loader_workers`` on a real mmengine Runner whose loaders keep two persistent worker
processes each: the workers of the named loops stop at once, the others keep running, and a loop
iterated again starts new workers."""

from __future__ import annotations

import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from groma_px.engine.stages import release_loader_workers


class _ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, mode="tensor"):
        out = self.linear(torch.stack(x) if isinstance(x, list) else x)
        if mode == "loss":
            return {"loss": out.pow(2).mean()}
        return list(out)


class _SumMetric(BaseMetric):
    default_prefix = "toy"

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(float(s) for s in data_samples)

    def compute_metrics(self, results) -> dict:
        return {"sum": sum(results), "count": len(results)}


def _runner(work_dir) -> Runner:
    data = [dict(x=torch.full((2,), float(i))) for i in range(8)]
    loader = dict(
        dataset=data,
        sampler=dict(type="InfiniteSampler", shuffle=False),
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        collate_fn=dict(type="default_collate"),
    )
    test_loader = {**loader, "sampler": dict(type="DefaultSampler", shuffle=False)}
    return Runner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=loader,
        test_dataloader=test_loader,
        test_evaluator=[_SumMetric()],
        train_cfg=dict(by_epoch=False, max_iters=3),
        test_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.0)),
        default_hooks=dict(checkpoint=None),
        visualizer=dict(type="Visualizer", name=f"toy_{work_dir.name}"),
        experiment_name=f"toy_{work_dir.name}",
    )


def _workers(iterator) -> list:
    return list(iterator._workers)


def test_named_loops_stop_their_workers_and_others_keep_theirs(tmp_path):
    runner = _runner(tmp_path / "run")
    runner.train()
    first = runner.test()
    train_workers = _workers(runner.train_loop.dataloader_iterator._iterator)
    test_workers = _workers(runner.test_loop.dataloader._iterator)
    assert len(train_workers) == 2 and len(test_workers) == 2
    assert all(w.is_alive() for w in train_workers + test_workers)

    assert release_loader_workers(runner, ("train",)) == 1
    assert not any(w.is_alive() for w in train_workers)
    assert all(w.is_alive() for w in test_workers)

    # A loop left mid-epoch (as the quickstart's pictures leave the test loader): prefetched
    # batches still in flight when its workers are stopped.
    next(iter(runner.test_loop.dataloader))
    assert release_loader_workers(runner) == 1  # the train loop's are already gone
    assert not any(w.is_alive() for w in test_workers)
    assert runner.test_loop.dataloader._iterator is None

    again = runner.test()  # new workers, same results
    assert again == first
    assert first["toy/count"] == 8
    new_workers = _workers(runner.test_loop.dataloader._iterator)
    assert all(w.is_alive() for w in new_workers)
    assert not set(map(id, new_workers)) & set(map(id, test_workers))
    assert release_loader_workers(runner, ("test",)) == 1


def test_loops_never_built_are_skipped(tmp_path):
    runner = _runner(tmp_path / "unbuilt")
    assert release_loader_workers(runner) == 0
