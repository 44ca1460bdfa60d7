"""``AtomicCheckpointHook`` in a real mmengine Runner on a toy model: ``save_best`` writes the new
best before it removes the old one (a failed write keeps the previous best loadable, where
mmengine's hook has already deleted it), and the random-number states it checkpoints are plain
values and tensors (``torch.load(weights_only=True)``), repeat every generator and survive
validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from groma_px.engine.checkpoint import (
    PARTIAL_SUFFIX,
    RNG_KEY,
    AtomicCheckpointHook,
    capture_rng_state,
    restore_rng_state,
)

#: Validation score after each of the toy run's iterations: a new best at 1, 2 and 4.
SCORES = [0.1, 0.5, 0.3, 0.9]


class _ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, mode="tensor"):
        x = torch.stack(x) if isinstance(x, list) else x
        out = self.linear(x)
        if mode == "loss":
            return {"loss": out.pow(2).mean()}
        return [out]


class _ScriptedMetric(BaseMetric):
    """Reports :data:`SCORES` in turn, one per validation."""

    default_prefix = "toy"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def process(self, data_batch, data_samples) -> None:
        self.results.append(0)

    def compute_metrics(self, results) -> dict:
        self.calls += 1
        return {"score": SCORES[self.calls - 1]}


def _runner(work_dir, hook_type: type = AtomicCheckpointHook) -> Runner:
    data = [dict(x=torch.full((2,), float(i))) for i in range(4)]
    loader = dict(
        dataset=data,
        sampler=dict(type="InfiniteSampler", shuffle=False),
        batch_size=2,
        collate_fn=dict(type="default_collate"),
    )
    val_loader = {**loader, "sampler": dict(type="DefaultSampler", shuffle=False)}
    return Runner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=loader,
        val_dataloader=val_loader,
        val_evaluator=[_ScriptedMetric()],
        train_cfg=dict(by_epoch=False, max_iters=len(SCORES), val_interval=1),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
        default_hooks=dict(
            checkpoint=dict(
                type=hook_type,
                interval=1,
                by_epoch=False,
                max_keep_ckpts=1,
                save_best="toy/score",
                rule="greater",
            )
        ),
        visualizer=dict(type="Visualizer", name=f"toy_{work_dir.name}"),
        experiment_name=f"toy_{work_dir.name}",
    )


def test_save_best_keeps_one_best_checkpoint_named_as_mmengine_does(tmp_path):
    runner = _runner(tmp_path / "atomic")
    runner.train()
    work = tmp_path / "atomic"
    assert sorted(p.name for p in work.glob("*.pth")) == ["best_toy_score_iter_4.pth", "iter_4.pth"]
    assert not list(work.glob(f".*{PARTIAL_SUFFIX}"))
    best = torch.load(work / "best_toy_score_iter_4.pth", map_location="cpu", weights_only=False)
    assert best["meta"]["iter"] == 4
    hub = best["message_hub"]["runtime_info"]
    assert hub["best_score"] == 0.9
    assert hub["best_ckpt"] == str(work / "best_toy_score_iter_4.pth")
    assert runner.message_hub.get_info("best_ckpt") == str(work / "best_toy_score_iter_4.pth")


def _fail_writing(name: str):
    put = LocalBackend.put

    def put_or_fail(self, obj, filepath):
        if name in str(filepath):
            raise OSError(28, "No space left on device", str(filepath))
        return put(self, obj, filepath)

    return put_or_fail


def test_a_failed_best_checkpoint_write_keeps_the_previous_best(tmp_path, monkeypatch):
    monkeypatch.setattr(LocalBackend, "put", _fail_writing("best_toy_score_iter_2"))
    work = tmp_path / "atomic_fail"
    with pytest.raises(OSError, match="No space left"):
        _runner(work).train()
    assert not (work / "best_toy_score_iter_2.pth").exists()
    assert not list(work.glob(f".*{PARTIAL_SUFFIX}"))  # the staged file is cleaned up
    previous = torch.load(
        work / "best_toy_score_iter_1.pth", map_location="cpu", weights_only=False
    )
    assert previous["meta"]["iter"] == 1


def test_mmengine_checkpoint_hook_deletes_the_previous_best_before_writing(tmp_path, monkeypatch):
    # Why the override: the same failure with mmengine's hook leaves no best checkpoint at all.
    monkeypatch.setattr(LocalBackend, "put", _fail_writing("best_toy_score_iter_2"))
    work = tmp_path / "stock_fail"
    with pytest.raises(OSError, match="No space left"):
        _runner(work, hook_type=CheckpointHook).train()
    assert not list(work.glob("best_*.pth"))


def test_checkpoints_carry_rng_states_that_load_with_weights_only(tmp_path):
    _runner(tmp_path / "rng").train()
    checkpoint = torch.load(tmp_path / "rng" / "iter_4.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint[RNG_KEY]) == 1  # one process
    # the states alone are plain values and tensors: they need no unpickling of classes
    torch.save(checkpoint[RNG_KEY], tmp_path / "rng_states.pth")
    state = torch.load(tmp_path / "rng_states.pth", weights_only=True)
    restore_rng_state(state[0])
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state[0])
    assert (random.random(), np.random.rand()) == first[:2]
    assert torch.equal(torch.rand(3), first[2])


def test_restored_rng_state_repeats_every_generator(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    state = capture_rng_state()
    path = tmp_path / "rng.pth"
    torch.save(state, path)
    expected = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(4))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(4))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_validation_leaves_the_training_random_stream_as_it_found_it():
    hook = AtomicCheckpointHook(interval=1)
    torch.manual_seed(0)
    np.random.seed(0)
    reference = (torch.rand(2), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    hook.before_val(runner=None)
    torch.rand(5), np.random.rand(7)  # what a validation pass draws
    hook.after_val(runner=None)
    after = (torch.rand(2), np.random.rand())
    assert torch.equal(after[0], reference[0]) and after[1] == reference[1]
