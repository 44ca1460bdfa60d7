"""The README's main job (tools/quickstart.py) and tools/validate_data.py, run as users run them."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from transformers import AutoTokenizer

from groma_px.llm.vocab import GroundingVocab

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    proc = _run(
        "tools/quickstart.py",
        "--work-dir",
        str(work),
        "--num-train",
        "24",
        "--num-val",
        "12",
        "--num-test",
        "12",
        "--workers",
        "2",
        "--loader-workers",
        "1",
        "--num-region-tokens",
        "16",
        "--stage1-iters",
        "2",
        "--stage2-iters",
        "2",
        "--stage3-iters",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (
        "4/8 drawing one preview per task",
        "5/8 stage 1: training the region proposer",
        "6/8 stage 2: alignment",
        "7/8 stage 3: fine-tuning",
        "8/8 evaluating grounded chat on the test split",
    ):
        assert step in proc.stdout
    assert "test split metrics" in proc.stdout and "rec/acc@0.5" in proc.stdout
    return work


def test_quickstart_outputs(quickstart_dir):
    summary = json.loads((quickstart_dir / "summary.json").read_text())
    assert summary["generation"]["splits"]["train"]["images"] == 24
    assert set(summary["records"]["val"]) >= {
        "rec",
        "region_caption",
        "grounded_caption",
        "counting",
    }
    for preview in summary["previews"]:
        assert Path(preview).stat().st_size > 0
    tokenizer = AutoTokenizer.from_pretrained(str(quickstart_dir / "tokenizer"))
    ids = GroundingVocab(16).token_ids(tokenizer)
    assert len(ids.regions) == 16 and len(tokenizer) == summary["tokenizer"]["size"]
    stage1 = summary["stage1"]
    assert 0.0 <= stage1["test"]["proposer/AR@100"] <= 1.0
    # --loader-workers 1 (the configs load in the main process): every stage has one worker.
    for stage in ("stage1", "stage2", "stage3"):
        (dumped,) = (quickstart_dir / stage).glob("*.py")
        cfg = Config.fromfile(str(dumped))
        for loader in (cfg.train_dataloader, cfg.test_dataloader):
            assert (loader.num_workers, loader.persistent_workers) == (1, True), stage
    # Stage 1 is tested, not validated too: no validation loop, no best checkpoint.
    (dumped,) = (quickstart_dir / "stage1").glob("*.py")
    cfg = Config.fromfile(str(dumped))
    assert cfg.val_cfg is None and cfg.val_dataloader is None
    assert "save_best" not in cfg.default_hooks.checkpoint
    assert not list((quickstart_dir / "stage1").glob("best_*.pth"))
    assert len(stage1["region_sets"]) == 4 and all(Path(p).is_file() for p in stage1["region_sets"])


def test_quickstart_chat_outputs(quickstart_dir):
    metrics = json.loads((quickstart_dir / "metrics.json").read_text())
    for key in ("rec/acc@0.5", "rec/ceiling", "proposer/AR@100", "caption/CIDEr", "gcap/f1"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["rec/ceiling"] >= metrics["rec/acc@0.5"]
    summary = json.loads((quickstart_dir / "summary.json").read_text())
    examples = summary["chat"]["examples"]
    assert examples and all(Path(p).stat().st_size > 0 for p in examples)
    model_dir = quickstart_dir / "model"
    assert {p.name for p in model_dir.iterdir()} >= {"config.py", "model.safetensors", "tokenizer"}
    assert summary["metrics"] == metrics


def _quickstart_args(work: Path, num_train: int = 24) -> list[str]:
    sizes = ["--num-train", str(num_train), "--num-val", "12", "--num-test", "12"]
    iters = ["--stage1-iters", "2", "--stage2-iters", "2", "--stage3-iters", "2"]
    return ["tools/quickstart.py", "--work-dir", str(work), *sizes, "--num-region-tokens", "16"] + (
        iters
    )


def test_quickstart_reuses_a_stage1_and_overrides_the_chat_configs(quickstart_dir, tmp_path):
    work = tmp_path / "ablation"
    proc = _run(
        *_quickstart_args(work),
        "--stage1-from",
        str(quickstart_dir),
        "--cfg-options",
        "model.region_loss_weight=2.5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stage 1: reusing {quickstart_dir / 'stage1'}" in proc.stdout
    assert not (work / "stage1").exists()
    summary = json.loads((work / "summary.json").read_text())
    first = json.loads((quickstart_dir / "summary.json").read_text())
    assert summary["stage1"]["test"] == first["stage1"]["test"]
    assert summary["stage1"]["checkpoint"] == str(quickstart_dir / "stage1" / "iter_2.pth")
    assert summary["cfg_options"] == {"model.region_loss_weight": 2.5}
    for stage in ("stage2", "stage3"):
        (dumped,) = (work / stage).glob("*.py")
        assert "region_loss_weight=2.5" in dumped.read_text()
        cfg = Config.fromfile(str(dumped))  # without --loader-workers: the config's
        assert (cfg.train_dataloader.num_workers, cfg.train_dataloader.persistent_workers) == (
            0,
            False,
        )
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["proposer/AR@100"] == first["metrics"]["proposer/AR@100"]
    assert 0.0 <= metrics["rec/acc@0.5"] <= 1.0


def test_quickstart_refuses_a_stage1_trained_on_other_data(quickstart_dir, tmp_path):
    proc = _run(
        *_quickstart_args(tmp_path / "other", num_train=20), "--stage1-from", str(quickstart_dir)
    )
    assert proc.returncode != 0
    assert f"--stage1-from {quickstart_dir}: its stage 1 trained on other data" in proc.stderr
    # a misspelt override fails before anything is generated or trained
    misspelt = tmp_path / "misspelt"
    proc = _run(*_quickstart_args(misspelt), "--cfg-options", "model.region_los_weight=2.5")
    assert proc.returncode != 0 and "region_los_weight" in proc.stderr
    assert not misspelt.exists()
    proc = _run(*_quickstart_args(misspelt), "--loader-workers", "-1")
    assert proc.returncode != 0 and "--loader-workers -1: must be 0 or more" in proc.stderr
    assert not misspelt.exists()


def test_validate_data_cli(quickstart_dir):
    data = quickstart_dir / "data"
    ok = _run("tools/validate_data.py", str(data / "val.jsonl"))
    assert ok.returncode == 0 and ", 0 bad" in ok.stdout
    lines = (data / "val.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["regions"][0]["box"] = [0, 0, record["width"] + 5, 10]
    bad = quickstart_dir / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(record), lines[2][:-10]]) + "\n")
    proc = _run("tools/validate_data.py", str(bad), "--data-root", str(data))
    assert proc.returncode == 1
    assert f"{bad}:2: regions[0].box:" in proc.stdout and f"{bad}:3: <json>:" in proc.stdout
    assert "1 good records" in proc.stdout and "2 bad" in proc.stdout


def _bench(name):
    path = ROOT / f"benchmarks/{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_oracle():
    return _bench("bench_oracle_proposals")


def test_bench_oracle_proposals_evaluates_the_quickstart_model(quickstart_dir, tmp_path):
    out = tmp_path / "oracle.json"
    result = _bench_oracle().main(
        ["--work-dir", str(quickstart_dir), "--rows", "learned", "oracle", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert set(rows) == {"learned", "oracle"}
    assert rows["learned"]["proposer"] == "trained"
    assert rows["oracle"]["proposer"]["type"] == "GroundTruthProposer"
    # Exact ground-truth boxes: every REC target is among the regions, whatever the model.
    assert rows["oracle"]["metrics"]["rec/ceiling"] == 1.0
    learned = rows["learned"]["metrics"]
    assert 0.0 <= learned["rec/acc@0.5"] <= learned["rec/ceiling"] <= 1.0
    assert learned["rec/count"] == rows["oracle"]["metrics"]["rec/count"] > 0


def test_bench_oracle_proposals_refuses_unknown_rows_and_missing_runs(quickstart_dir, tmp_path):
    bench = _bench_oracle()
    with pytest.raises(SystemExit, match="oracle"):
        bench.main(["--work-dir", str(quickstart_dir), "--rows", "orcale"])
    with pytest.raises(FileNotFoundError, match="quickstart"):
        bench.main(["--work-dir", str(tmp_path), "--out", str(tmp_path / "x.json")])


def test_bench_selection_evaluates_each_rule_on_val(quickstart_dir, tmp_path):
    out = tmp_path / "selection.json"
    args = ["--work-dir", str(quickstart_dir), "--out", str(out), "--score-thr", "0.02"]
    result = _bench("bench_selection").main([*args, "--nms-thr", "0.6"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["split"] == "val"
    rows = result["rows"]
    assert list(rows) == ["trained", "score>=0.02 nms0.6"]
    # the config's test rule (its test_cfg), not its training rule (0.1 / 0.5)
    assert rows["trained"]["selector"] == {"score_thr": 0.05, "nms_thr": 0.6}
    trained, looser = rows["trained"]["metrics"], rows["score>=0.02 nms0.6"]["metrics"]
    # Same NMS, lower threshold: the kept set only grows, so the ceiling cannot fall.
    assert looser["rec/ceiling"] >= trained["rec/ceiling"]
    assert looser["rec/count"] == trained["rec/count"] > 0
    assert result["best_rec"] in rows
    with pytest.raises(SystemExit, match="nms-thr"):
        _bench("bench_selection").main([*args, "--nms-thr", "1.5"])


def test_bench_train_steps_times_the_quickstart_stages(quickstart_dir, tmp_path):
    bench = _bench("bench_train_steps")
    out = tmp_path / "steps.json"
    args = ["--work-dir", str(quickstart_dir), "--out", str(out)]
    result = bench.main(
        [*args, "--steps", "1", "--rounds", "2", "--batches", "2", "--repeats", "1"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for stage in ("stage1", "stage3"):
        workers = result["loader_workers"][stage]
        assert {len(workers["blocks"][w]) for w in ("0", "2")} == {2}
    pixels = result["mask_pixels"]
    assert 1 <= pixels["cited_images_per_batch"] <= pixels["batch_size"]
    assert min(pixels["cited_s"], pixels["all_s"], pixels["mask_loss_s"]) > 0
    sampler = result["stage3_sampler"]
    assert {len(sampler["blocks"][s]) for s in ("length_grouped", "shuffled")} == {2}
    # Grouping by length pads less (the tiny run's records differ enough in length).
    assert 0 < sampler["shuffled_real_positions"] < sampler["length_grouped_real_positions"] <= 1
    groups = result["stage3_length_groups"]
    assert groups["length_groups"] == 2 and {len(v) for v in groups["blocks"].values()} == {2}
    # Cutting each group to its longest row computes fewer padding positions, same losses.
    assert 0 < groups["padded_real_positions"] <= groups["grouped_real_positions"] <= 1
    assert groups["max_loss_difference"] < 1e-4
    assert set(result["ratios"]) == {
        "stage1 step, loader workers 0 vs 2",
        "stage3 step, loader workers 0 vs 2",
        "mask pixels fwd+bwd, cited vs all images",
        "stage3 step, length-grouped vs shuffled",
        "stage3 step, LLM length groups 2 vs padded",
    }
    only = bench.main([*args, "--steps", "1", "--rounds", "1", "--sections", "length_groups"])
    assert set(only) - set(result) == set() and "loader_workers" not in only
    with pytest.raises(FileNotFoundError, match="quickstart"):
        bench.main(["--work-dir", str(tmp_path), "--out", str(tmp_path / "x.json")])


def test_bench_autocast_times_both_precisions_on_the_quickstart_stages(quickstart_dir, tmp_path):
    out = tmp_path / "autocast.json"
    result = _bench("bench_autocast").main(
        ["--work-dir", str(quickstart_dir), "--steps", "1", "--rounds", "2", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for stage in ("stage1", "stage3"):
        timing = result["stages"][stage]
        assert {len(timing["blocks"][p]) for p in ("fp32", "bf16")} == {2}
        assert min(timing["fp32_s"], timing["bf16_s"]) > 0
        # bf16 products change the loss a little, not wholesale.
        assert 0 < timing["loss_rel_difference"] < 0.1
    assert set(result["ratios"]) == {"stage1", "stage3"}


def test_bench_optimizer_times_the_adamw_variants_on_the_quickstart_stages(
    quickstart_dir, tmp_path
):
    out = tmp_path / "optimizer.json"
    result = _bench("bench_optimizer").main(
        ["--work-dir", str(quickstart_dir), "--steps", "2", "--rounds", "2", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for stage in ("stage1", "stage3"):
        timing = result["stages"][stage]
        assert timing["parameters"] > 0 and timing["tensors"] > 1
        assert {len(v) for v in timing["blocks"].values()} == {2}
        assert min(timing[f"{v}_ms"] for v in ("per_tensor", "foreach", "fused")) > 0
        # The same update: the variants differ by rounding only (lr 1e-3 or 4e-4 steps).
        assert timing["max_abs_difference"] < 1e-6
    assert set(result["ratios"]) == {"stage1", "stage3"}
