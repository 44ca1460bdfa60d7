"""W&B logging: the offline-run reader, mode resolution, the vis backend's runs, and a tiny GromaPX
Runner whose offline run is read back (losses, lr, throughput, metrics, diagnostics, media)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import BaseDataElement, InstanceData

from groma_px.data.synthetic import generate_dataset
from groma_px.engine.stages import chat_config
from groma_px.engine.wandb_logging import (
    GromaWandbVisBackend,
    GroundingLoggerHook,
    find_offline_runs,
    logged_table,
    read_offline_run,
    resolve_wandb_mode,
)
from groma_px.llm.tokenizer import build_tokenizer_from_jsonl
from groma_px.llm.vocab import GroundingVocab

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "groma-px_tiny.py"
WANDB_TYPE = "groma_px.GromaWandbVisBackend"
WAIT_S = 30.0  # wandb may return from finish() before its last 32 KiB block is on disk


@pytest.fixture
def wandb_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline and enabled (the suite's conftest turns it off), artifacts staged in tmp."""
    monkeypatch.setenv("GROMA_PX_WANDB", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No W&B key anywhere: no key variables, ``$NETRC`` and ``$HOME`` point into tmp."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GROMA_PX_WANDB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


# ---- reader --------------------------------------------------------------------------------
def test_reader_returns_exactly_what_was_logged(wandb_on: None, tmp_path: Path) -> None:
    import wandb

    run = wandb.init(
        project="reader", mode="offline", dir=str(tmp_path), config={"lr": 0.25, "m": {"d": 3}}
    )
    run.config.update({"extra": [1, 2]})
    rows = [{"loss": 1.5, "rec/acc@0.5": 0.25, "d": {"e": 3}, "s": "hi", "b": True}]
    rows += [{"loss": 0.5 * i, f"k{i % 3}": i} for i in range(300)]
    rows += [{"big": "x" * 70_000}]  # spans blocks: FIRST / MIDDLE / LAST pieces
    for row in rows:
        run.log(row)
    run.summary["final"] = 42
    run.finish()

    (path,) = find_offline_runs(tmp_path)
    out = read_offline_run(path, wait_s=WAIT_S)
    assert out["run"]["id"] == run.id and out["run"]["project"] == "reader"
    assert out["config"]["lr"] == 0.25 and out["config"]["m"] == {"d": 3}
    assert out["config"]["extra"] == [1, 2]
    assert len(out["history"]) == len(rows)
    for step, (logged, read) in enumerate(zip(rows, out["history"], strict=True)):
        assert read["_step"] == step
        assert {k: v for k, v in read.items() if not k.startswith("_")} == logged
    assert out["summary"]["final"] == 42 and out["summary"]["loss"] == 0.5 * 299


def test_reader_rejects_foreign_and_corrupt_files(wandb_on: None, tmp_path: Path) -> None:
    import wandb

    run = wandb.init(project="reader", mode="offline", dir=str(tmp_path / "ok"))
    run.log({"a": 1})
    run.finish()
    (path,) = find_offline_runs(tmp_path / "ok")
    assert read_offline_run(path, wait_s=WAIT_S)["history"][0]["a"] == 1
    foreign = tmp_path / "run-foreign.wandb"
    foreign.write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="run-foreign.wandb: not a W&B run file"):
        read_offline_run(foreign)
    data = bytearray(path.read_bytes())
    _, length, _ = struct.unpack_from("<IHB", data, 7)
    data[7 + 7 + length // 2] ^= 0xFF  # flip a byte inside the first record
    corrupt = tmp_path / "run-corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="run-corrupt.wandb: record at byte 7 fails"):
        read_offline_run(corrupt)
    with pytest.raises(FileNotFoundError, match="expected one run"):
        read_offline_run(tmp_path / "missing")


# ---- mode ----------------------------------------------------------------------------------
def test_mode_is_offline_without_credentials(no_credentials: Path) -> None:
    assert resolve_wandb_mode() == "offline"
    no_credentials.write_text("machine example.com login user password secret\n")
    assert resolve_wandb_mode() == "offline"  # a key for another host does not count


def test_mode_follows_login_env_and_switch(
    no_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_credentials.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert resolve_wandb_mode() == "online"
    no_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit choice wins over the login
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode({"mode": "disabled"}) == "disabled"
    monkeypatch.setenv("GROMA_PX_WANDB", "0")
    assert resolve_wandb_mode({"mode": "online"}) == "disabled"


def test_disabled_backend_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROMA_PX_WANDB", "0")
    backend = GromaWandbVisBackend(str(tmp_path / "vis"))
    backend.add_config(Config({"a": 1}))
    backend.add_scalars({"loss": 1.0})
    backend.close()
    assert backend.experiment is None and not (tmp_path / "vis").exists()


# ---- backend -------------------------------------------------------------------------------
def test_backends_own_their_runs_and_reopen_after_close(wandb_on: None, tmp_path: Path) -> None:
    first = GromaWandbVisBackend(str(tmp_path / "a"), init_kwargs={"config": {"lr": 9.0}})
    second = GromaWandbVisBackend(str(tmp_path / "b"), init_kwargs={"tags": ["b"]})
    first.add_config(Config({"lr": 1.0, "model": {"type": "X"}}))
    second.add_scalars({"loss": 2.0})
    first.add_scalars({"loss": 1.0})
    first.close()
    second.close()
    first.add_scalars({"test/acc": 0.5})  # after close: a new run, same kwargs and config
    first.close()

    runs_a = [read_offline_run(p) for p in find_offline_runs(tmp_path / "a", wait_s=WAIT_S)]
    (run_b,) = [read_offline_run(p) for p in find_offline_runs(tmp_path / "b", wait_s=WAIT_S)]
    assert [_logged(r) for r in runs_a] == [[{"loss": 1.0}], [{"test/acc": 0.5}]]
    assert _logged(run_b) == [{"loss": 2.0}] and run_b["run"]["tags"] == ["b"]
    for run in runs_a:
        assert run["run"]["project"] == "groma-px"
        assert run["config"]["lr"] == 9.0  # the init-kwargs override wins
        assert run["config"]["model"] == {"type": "X"}
    assert len({r["run"]["id"] for r in [*runs_a, run_b]}) == 3


# ---- a Runner ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 train / 4 val / 4 test synthetic images and a tokenizer with 16 region tokens."""
    root = tmp_path_factory.mktemp("wandb_tiny")
    generate_dataset(root / "data", 8, 4, 4, seed=0)
    build_tokenizer_from_jsonl(
        [root / "data" / "train.jsonl"], root / "tokenizer", vocab=GroundingVocab(16)
    )
    return {"data_root": root / "data", "tokenizer_dir": root / "tokenizer"}


@pytest.mark.slow
def test_runner_run_reads_back(wandb_on: None, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from mmengine.runner import Runner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split across threads
    try:
        cfg = _runner_cfg(tiny_data, tmp_path / "work")
        runner = Runner.from_cfg(cfg)
        runner.train()
        test_metrics = runner.test()
    finally:
        torch.set_num_threads(threads)

    runs = find_offline_runs(tmp_path / "work", wait_s=WAIT_S)
    train_run, test_run = (read_offline_run(p) for p in runs)
    for run in (train_run, test_run):
        assert run["config"]["sweep_lr"] == 0.5 and run["config"]["train_cfg"]["max_iters"] == 3
        assert run["run"]["group"] == "g" and run["run"]["tags"] == ["t"]

    steps = {row["iter"]: row for row in train_run["history"] if "loss" in row}
    assert sorted(steps) == [1, 2, 3]
    for row in steps.values():
        assert math.isfinite(row["loss"]) and row["lr"] > 0 and row["throughput"] > 0
    val = _merged(train_run)
    assert {"rec/acc@0.5", "count/acc", "val/proposer/num_kept"} <= set(val)
    assert val["val/proposer/scores"]["_type"] == "histogram"

    test = _merged(test_run)
    finite = {k: float(v) for k, v in test_metrics.items() if math.isfinite(float(v))}
    assert finite and all(test[f"test/{k}"] == pytest.approx(v) for k, v in finite.items())
    assert test["test/proposer/num_kept"] > 0 and 0 <= test["test/proposer/AR@100"] <= 1
    assert 0 <= test["test/proposer/region_set_recall@0.5"] <= 1
    hist = test["test/proposer/scores"]
    assert hist["_type"] == "histogram" and len(hist["bins"]) == len(hist["values"]) + 1
    # Each distinct (image, ground truth) counts once, however many records repeat it.
    dataset = runner.test_dataloader.dataset
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    distinct = {(d["img_path"], tuple(tuple(r["box"]) for r in d["regions"])) for d in infos}
    assert len(distinct) < len(infos)
    assert sum(hist["values"]) == round(test["test/proposer/num_proposals"] * len(distinct))

    assert test["test/examples"]["_type"] == "table-file" and test["test/examples"]["nrows"] == 3
    table = logged_table(test_run, "test/examples")
    assert table["columns"] == ["sample_id", "task", "image", "question", "answer", "reference"]
    for sample_id, task, image, *_ in table["data"]:
        assert sample_id and task and image["_type"] == "image-file"
        assert Path(table["files"][image["path"]]).stat().st_size > 0


def _runner_cfg(tiny_data: dict[str, Path], work_dir: Path) -> Config:
    """The tiny config for 3 iterations (validating after the last), logging every iteration,
    with W&B init kwargs and a 3-row examples table."""
    cfg = chat_config(
        TINY_CONFIG,
        data_root=tiny_data["data_root"],
        tokenizer_dir=tiny_data["tokenizer_dir"],
        work_dir=work_dir,
        load_from=None,
    )
    cfg.train_cfg.max_iters = 3  # mmengine validates after the last iteration
    (wandb_cfg,) = [b for b in cfg.visualizer.vis_backends if b["type"] == WANDB_TYPE]
    wandb_cfg["init_kwargs"] = {"config": {"sweep_lr": 0.5}, "group": "g", "tags": ["t"]}
    cfg.custom_hooks = [dict(type="groma_px.GroundingLoggerHook", num_examples=3)]
    cfg.log_level = "WARNING"
    return cfg


def _logged(run: dict) -> list[dict]:
    """History rows without W&B's own ``_step``/``_runtime``/``_timestamp``."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]]


def _merged(run: dict) -> dict:
    """Every history row merged into one dict (later rows win)."""
    merged: dict = {}
    for row in _logged(run):
        merged.update(row)
    return merged


def test_diagnostics_count_each_image_once() -> None:
    """Records repeating an image with the same ground truth and proposals count once (as the
    stage-1 recall metric counts images); another ground truth or kept set counts again."""

    def record(image: str, gt: list, kept: list) -> BaseDataElement:
        sample = BaseDataElement(metainfo={"img_path": image, "ori_shape": (100, 100)})
        sample.proposals = InstanceData(
            metainfo={"valid_size": (100, 100)},
            bboxes=torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]]),
            scores=torch.tensor([0.9, 0.2]),
        )
        sample.gt_boxes_original = torch.tensor(gt, dtype=torch.float32)
        sample.kept_boxes = torch.tensor(kept, dtype=torch.float32)
        return sample

    gt = [[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 70.0, 70.0]]
    hook = GroundingLoggerHook()
    hook._reset()
    hook._collect(
        [record("a.png", gt, [[10, 10, 50, 50]]), record("a.png", gt, [[10, 10, 50, 50]])]
    )
    hook._collect([record("a.png", gt, [[10, 10, 50, 50], [0, 0, 5, 5]])])  # + a user box
    hook._collect(
        [record("a.png", gt[:1], [[10, 10, 50, 50]]), record("b.png", gt, [[1, 1, 2, 2]])]
    )
    assert len(hook._ar_inputs) == 3 and hook._num_proposals == [2, 2, 2]
    assert hook._num_kept == [1, 2, 1, 1] and hook._num_gt == 2 + 2 + 1 + 2
    assert hook._hits[0.5] == 1 + 1 + 1 + 0
    diagnostics = hook._diagnostics("test/proposer")
    assert diagnostics["test/proposer/region_set_recall@0.5"] == pytest.approx(3 / 7)
    assert 0 < diagnostics["test/proposer/AR@100"] < 1
