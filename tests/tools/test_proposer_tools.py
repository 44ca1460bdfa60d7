"""Stage-1 tools as users run them: train.py (Runner), test.py (--out JSON), cache_proposals.py,
and evaluating the cached proposals through the ``cached`` preset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from groma_px.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/proposer/ddetr_vit-tiny_synthetic.py"


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _options(data_root):
    opts = [
        "train_cfg.max_iters=3",
        "train_cfg.val_interval=3",
        "default_hooks.logger.interval=1",
        "train_dataloader.batch_size=2",
    ]
    for split in ("train", "val", "test"):
        opts += [
            f"{split}_dataloader.dataset.data_root={data_root}",
            f"{split}_dataloader.num_workers=0",
            f"{split}_dataloader.persistent_workers=False",
        ]
    return opts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    generate_dataset(tmp / "data", 6, 3, 3, seed=3)
    work = tmp / "work"
    proc = _run(
        "tools/train.py", CONFIG, "--work-dir", str(work), "--cfg-options", *_options(tmp / "data")
    )
    assert "Iter(train) [3/3]" in proc.stdout + proc.stderr
    return tmp, work, work / "iter_3.pth"


def test_train_writes_checkpoint_and_validates(trained):
    _, work, ckpt = trained
    assert ckpt.is_file()
    logs = list(work.rglob("scalars.json"))
    assert logs, "no scalar log written"
    text = logs[0].read_text()
    assert "loss_focal" in text and "proposer/AR@100" in text


def test_test_tool_writes_flat_metrics(trained):
    tmp, work, ckpt = trained
    out = tmp / "metrics.json"
    proc = _run(
        "tools/test.py",
        CONFIG,
        str(ckpt),
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--cfg-options",
        *_options(tmp / "data"),
    )
    metrics = json.loads(out.read_text())
    for key in (
        "proposer/AR@1",
        "proposer/AR@10",
        "proposer/AR@100",
        "proposer/region_set_recall@0.5",
        "proposer/num_kept",
    ):
        assert isinstance(metrics[key], float), key
        assert 0.0 <= metrics[key] <= (100 if key.endswith("num_kept") else 1.0)
    assert "proposer/AR@100" in proc.stdout


def test_cache_then_evaluate_cached_preset(trained):
    tmp, work, ckpt = trained
    cache = tmp / "val_proposals.safetensors"
    _run(
        "tools/cache_proposals.py",
        CONFIG,
        str(ckpt),
        "--out",
        str(cache),
        "--split",
        "val",
        "--work-dir",
        str(work),
        "--cfg-options",
        *_options(tmp / "data"),
    )
    assert cache.is_file()
    out_trained, out_cached = tmp / "m_trained.json", tmp / "m_cached.json"
    _run(
        "tools/test.py",
        CONFIG,
        str(ckpt),
        "--out",
        str(out_trained),
        "--work-dir",
        str(work),
        "--cfg-options",
        *_options(tmp / "data"),
        "test_dataloader.dataset.ann_file=annotations/instances_val_agnostic.json",
    )
    _run(
        "tools/test.py",
        CONFIG,
        str(ckpt),
        "--out",
        str(out_cached),
        "--work-dir",
        str(work),
        "--cfg-options",
        "preset=_base_/proposers/cached",
        f"model.proposer.path={cache}",
        *_options(tmp / "data"),
        "test_dataloader.dataset.ann_file=annotations/instances_val_agnostic.json",
    )
    trained_metrics = json.loads(out_trained.read_text())
    cached_metrics = json.loads(out_cached.read_text())
    for key in ("proposer/AR@100", "proposer/region_set_recall@0.5"):
        assert cached_metrics[key] == pytest.approx(trained_metrics[key], abs=1e-6)
