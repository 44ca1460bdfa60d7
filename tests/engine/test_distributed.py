"""Data-parallel training and evaluation through ``tools/`` on CPU/gloo (``torchrun``): 2
processes x batch b train like 1 process x batch 2b, each rank sees its own samples, and
2-process evaluation gives the single-process metrics to the last digit."""

from __future__ import annotations

import contextlib
import json
import pickle
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config

from groma_px.engine import tiny_runs
from groma_px.models.outputs import next_token_loss

ITERS = 4
TEST_EVALUATORS = list(Config.fromfile(str(tiny_runs.TINY_CONFIG)).test_evaluator)
NUM_TEST = 9  # odd: 2 ranks get 5 and 4 (+1 padding) samples

RECORD_HOOK = textwrap.dedent(
    """
    import json
    from pathlib import Path

    from mmengine.dist import get_rank
    from mmengine.hooks import Hook

    from groma_px.registry import HOOKS


    @HOOKS.register_module()
    class RecordSampleIdsHook(Hook):
        # Appends each iteration's sample ids of this rank to samples_rank{r}.jsonl.
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            ids = [s.metainfo["sample_id"] for s in data_batch["data_samples"]]
            path = Path(runner.work_dir) / f"samples_rank{get_rank()}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps({"iter": runner.iter, "ids": ids}) + "\\n")
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The workspace, a config recording sample ids, and its 1- and 2-process training runs."""
    root = tmp_path_factory.mktemp("distributed")
    workspace = tiny_runs.make_workspace(root, num_train=16, num_test=2)
    (root / "hooks").mkdir()
    (root / "hooks" / "record_sample_ids.py").write_text(RECORD_HOOK)
    config = tiny_runs.write_config(
        root / "tiny.py",
        workspace,
        options={
            "train_cfg.max_iters": ITERS,
            "default_hooks.checkpoint.interval": 2,
            "default_hooks.checkpoint.max_keep_ckpts": 2,
        },
        additions={
            "custom_imports": dict(imports=["groma_px.engine", "record_sample_ids"]),
            "custom_hooks": [dict(type="RecordSampleIdsHook")],
            "test_dataloader.dataset.indices": NUM_TEST,
            # per-sample predictions, to compare beyond the metrics
            "test_evaluator": [*TEST_EVALUATORS, dict(type="DumpResults", out_file_path="x.pkl")],
        },
    )
    work = {1: root / "one", 2: root / "two"}
    for nproc, batch in ((1, 4), (2, 2)):
        tiny_runs.run_tool(
            "train",
            [str(config), "--work-dir", str(work[nproc]), "--cfg-options"]
            + [f"train_dataloader.batch_size={batch}"],
            nproc=nproc,
            extra_pythonpath=[root / "hooks"],
        )
    return {"root": root, "config": config, "work": work}


def _abs_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    assert a.keys() == b.keys()
    return torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one_with_the_same_global_batch(setup):
    one = tiny_runs.load_weights(setup["work"][1] / f"iter_{ITERS}.pth")
    two = tiny_runs.load_weights(setup["work"][2] / f"iter_{ITERS}.pth")
    diffs = _abs_diffs(one, two)
    # Float tolerance: the gradient all-reduce sums in another order. AdamW divides by
    # sqrt(v), so on a handful of near-zero gradients that rounding becomes a visible share of
    # a step (measured: 4 of 3e5 weights differ by > 1e-6, at most 2e-5; mean 1e-9).
    assert diffs.mean() < 1e-7
    assert (diffs > 1e-6).float().mean() < 1e-4
    assert diffs.max() < 1e-4
    # ... all far below what two AdamW steps (lr 1e-3) move the weights
    halfway = tiny_runs.load_weights(setup["work"][1] / f"iter_{ITERS // 2}.pth")
    assert _abs_diffs(one, halfway).max() > 1e-3


def _sample_ids(work_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (work_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return {row["iter"]: row["ids"] for row in map(json.loads, lines)}


@pytest.mark.slow
def test_ranks_see_disjoint_shards_of_the_single_process_batches(setup):
    single = _sample_ids(setup["work"][1], 0)
    rank0, rank1 = (_sample_ids(setup["work"][2], r) for r in (0, 1))
    assert sorted(single) == sorted(rank0) == sorted(rank1) == list(range(ITERS))
    for it in range(ITERS):
        assert len(rank0[it]) == len(rank1[it]) == 2
        assert not set(rank0[it]) & set(rank1[it])
        assert set(rank0[it]) | set(rank1[it]) == set(single[it])
    seen0 = {i for ids in rank0.values() for i in ids}
    seen1 = {i for ids in rank1.values() for i in ids}
    assert not seen0 & seen1


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process_to_the_last_digit(setup):
    checkpoint = setup["work"][1] / f"iter_{ITERS}.pth"
    outputs = {}
    for nproc in (1, 2):
        out = setup["root"] / f"eval{nproc}"
        tiny_runs.run_tool(
            "test",
            [
                str(setup["config"]),
                str(checkpoint),
                "--work-dir",
                str(out),
                "--out",
                str(out / "metrics.json"),
                "--cfg-options",
                f"test_evaluator.{len(TEST_EVALUATORS)}.out_file_path={out / 'preds.pkl'}",
            ],
            nproc=nproc,
            extra_pythonpath=[setup["root"] / "hooks"],
        )
        metrics = json.loads((out / "metrics.json").read_text())
        with open(out / "preds.pkl", "rb") as f:
            preds = pickle.load(f)
        outputs[nproc] = (metrics, preds)
    (metrics1, preds1), (metrics2, preds2) = outputs[1], outputs[2]
    assert metrics1 == metrics2
    # Per sample, in dataset order: padding samples dropped, none missing, same answers.
    assert len(preds1) == len(preds2) == NUM_TEST
    ids1 = [p["sample_id"] for p in preds1]
    assert ids1 == [p["sample_id"] for p in preds2]
    assert len(set(ids1)) == NUM_TEST
    assert [p["pred_text"] for p in preds1] == [p["pred_text"] for p in preds2]


class _TwoRankGroup:
    """Stands in for a 2-rank process group whose other rank holds ``other_count`` tokens."""

    def __init__(self, other_count: float) -> None:
        self.other_count = other_count

    def all_reduce(self, tensor: torch.Tensor) -> None:
        tensor += self.other_count


def test_global_token_average_gives_the_single_process_gradient_under_ddp_averaging(
    monkeypatch: pytest.MonkeyPatch,
):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 10, generator=gen)
    labels = torch.randint(0, 10, (3, 5), generator=gen)
    labels[0, 1:] = -100  # rank 0 (row 0): 1 supervised token; rank 1 (rows 1, 2): 10
    region_ids = torch.tensor([7, 8])
    whole = logits.clone().requires_grad_(True)
    next_token_loss(whole, labels, region_ids, 2.0)["loss"].backward()
    shards = {0: [0], 1: [1, 2]}
    counts = {r: _weighted_count(labels[rows], region_ids) for r, rows in shards.items()}
    grads = torch.zeros_like(logits)
    for rank, rows in shards.items():
        group = _TwoRankGroup(counts[1 - rank])
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
        mine = logits[rows].clone().requires_grad_(True)
        out = next_token_loss(mine, labels[rows], region_ids, 2.0, global_average=True)
        out["loss"].backward()
        grads[rows] = mine.grad / 2  # DDP averages the ranks' gradients
    torch.testing.assert_close(grads, whole.grad, rtol=1e-6, atol=1e-8)


def _weighted_count(labels: torch.Tensor, region_ids: torch.Tensor) -> float:
    """Supervised tokens, region targets counted twice (``region_weight=2``)."""
    supervised = labels != -100
    return float((supervised.float() + torch.isin(labels, region_ids).float()).sum())


def test_slurm_launcher_on_cpu_maps_the_slurm_variables(monkeypatch: pytest.MonkeyPatch):
    from region_proposer.runtime import init_cpu_distributed

    if torch.cuda.is_available() or dist.is_initialized():
        pytest.skip("needs a CPU-only process without a process group")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    env.update(SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    init_cpu_distributed("slurm")
    try:
        assert dist.get_backend() == "gloo"
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fails", [False, True])
def test_distributed_session_destroys_its_group_on_the_way_out(
    monkeypatch: pytest.MonkeyPatch, fails: bool
):
    """A rank that exits with its group alive can abort in teardown (CI saw SIGABRT after a
    finished run); the session destroys the group after a clean body and after an exception."""
    from region_proposer.runtime import distributed_session

    if torch.cuda.is_available() or dist.is_initialized():
        pytest.skip("needs a CPU-only process without a process group")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(tiny_runs.free_port()))
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with contextlib.ExitStack() as stack:
        if fails:
            stack.enter_context(pytest.raises(KeyError, match="boom"))
        with distributed_session("pytorch"):
            assert dist.is_initialized() and dist.get_backend() == "gloo"
            if fails:
                raise KeyError("boom")
    assert not dist.is_initialized()
