"""Sweeps: spec validation, grid/random/optuna proposals, the W&B sweep config, the results table,
and one end-to-end sweep of the tiny config (trial processes, W&B runs, resume, a failed trial)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from groma_px.engine.sweep import (
    GridSearch,
    RandomSearch,
    Sweep,
    SweepSpecError,
    execute_trial,
    load_spec,
    make_search,
    parse_assignments,
    trial_options,
    wandb_sweep_config,
    write_results,
)
from groma_px.engine.sweep.executor import _collect, _Running

TINY = "configs/tiny/groma-px_tiny.py"
LEGACY_ON = {"model.region_encoder": {"legacy_groma_roi": True}}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "unit",
        "config": TINY,
        "method": "random",
        "num_trials": 8,
        "parameters": {
            "preset": {"values": ["tiny/proposers/gt", "tiny/proposers/detr"]},
            "model.selector.nms_thr": {"min": 0.3, "max": 0.9},
            "model.selector.top_k": {"min": 2, "max": 64, "log": True},
            "legacy_roi": {"choices": {"off": {}, "on": LEGACY_ON}},
        },
        "metric": {"name": "rec/acc@0.5", "goal": "maximize"},
    }
    return {**spec, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"paramters": {}}, "unknown field 'paramters'; did you mean 'parameters'"),
        ({"method": "bayes"}, "method: unknown 'bayes'"),
        ({"method": "grid"}, "parameters.model.selector.nms_thr: grid search needs values"),
        ({"num_trials": None}, "num_trials: required for method 'random'"),
        ({"config": "configs/nope.py"}, "config: configs/nope.py not found"),
        ({"metric": {"name": "x", "goal": "up"}}, "metric.goal: maximize or minimize"),
        ({"parallel": 0}, "parallel: expected an integer >= 1"),
        ({"wandb": {"mode": "cloud"}}, "wandb.mode: offline, online or disabled"),
        ({"parameters": {"a": {"values": [1], "min": 0}}}, "parameters.a: give exactly one of"),
        ({"parameters": {"a": {"values": [{"x": 1}]}}}, "parameters.a.values: only scalars"),
        ({"parameters": {"a": {"min": 0, "max": 1, "log": True}}}, "log: true needs min > 0"),
        ({"parameters": {"a": {"min": 2, "max": 1}}}, "parameters.a: min (2) must be below"),
        ({"parameters": {"a": {"min": 0, "max": 1, "step": 1}}}, "parameters.a: unknown field"),
        ({"parameters": {"a": {"min": 0}}}, "parameters.a: a range needs both min: and max:"),
        ({"parameters": {"a": {"values": [1], "log": True}}}, "log:/type: belong to"),
    ],
)
def test_spec_errors_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(SweepSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_spec(spec_dict(**overrides))


@pytest.mark.parametrize(
    ("where", "overrides", "message"),
    [
        ("parameters", {"model.selector.nms_thres": [0.5]}, "did you mean nms_thr"),
        ("parameters", {"p": {"choices": {"a": {"model.nope": 1}}}}, "model has no key 'nope'"),
        ("parameters", {"preset": ["tiny/proposers/nope"]}, "preset 'tiny/proposers/nope' not"),
        ("base_options", {"train_cfg.max_iter": 2}, "did you mean max_iters"),
    ],
)
def test_keys_the_config_lacks_fail_before_any_trial(
    tmp_path: Path, where: str, overrides: dict, message: str
) -> None:
    raw = spec_dict(method="grid", parameters={"model.layout": ["pair"]}, wandb=False)
    raw[where] = {**raw.get(where, {}), **overrides}
    sweep = Sweep(load_spec(raw), tmp_path, echo=lambda line: None)
    with pytest.raises(SweepSpecError, match=f"^{where}") as info:
        sweep.prepare()
    assert message in str(info.value)
    assert not list(tmp_path.glob("trial_*"))


def test_grid_is_the_cartesian_product_in_spec_order() -> None:
    parameters = {"model.layout": ["pair", "fused"], "roi": {"choices": {"off": {}, "on": {}}}}
    spec = load_spec(spec_dict(method="grid", num_trials=None, parameters=parameters))
    search = make_search(spec)
    assert isinstance(search, GridSearch) and spec.total_trials == 4
    points = [search.propose(i) for i in range(4)]
    assert points == [
        {"model.layout": "pair", "roi": "off"},
        {"model.layout": "pair", "roi": "on"},
        {"model.layout": "fused", "roi": "off"},
        {"model.layout": "fused", "roi": "on"},
    ]
    assert (
        load_spec(spec_dict(method="grid", num_trials=3, parameters=parameters)).total_trials == 3
    )


def test_random_search_is_seeded_per_trial_and_within_ranges() -> None:
    spec = load_spec(spec_dict(seed=3))
    search = make_search(spec)
    assert isinstance(search, RandomSearch)
    draws = [search.propose(i) for i in range(8)]
    assert draws == [RandomSearch(spec).propose(i) for i in range(8)]  # reproducible
    assert draws[5] == make_search(spec).propose(5)  # trial 5 alone: same draw (resume)
    assert draws != [make_search(load_spec(spec_dict(seed=4))).propose(i) for i in range(8)]
    for d in draws:
        assert d["preset"] in ("tiny/proposers/gt", "tiny/proposers/detr")
        assert 0.3 <= d["model.selector.nms_thr"] <= 0.9
        assert isinstance(d["model.selector.top_k"], int) and 2 <= d["model.selector.top_k"] <= 64
        assert d["legacy_roi"] in ("off", "on")
    assert len({d["model.selector.nms_thr"] for d in draws}) == 8


def test_optuna_proposes_within_ranges_and_learns_from_results() -> None:
    spec = load_spec(spec_dict(method="optuna", seed=0))
    search, proposals = make_search(spec), []
    for i in range(8):
        params = search.propose(i)
        proposals.append(params)
        assert 0.3 <= params["model.selector.nms_thr"] <= 0.9
        assert isinstance(params["model.selector.top_k"], int)
        assert 2 <= params["model.selector.top_k"] <= 64
        assert params["legacy_roi"] in ("off", "on")
        search.tell(i, None if i == 2 else params["model.selector.nms_thr"])
    states = [t.state.name for t in search.study.trials]
    assert states.count("COMPLETE") == 7 and states.count("FAIL") == 1
    again = make_search(spec)
    assert [again.propose(i) for i in range(3)] == proposals[:3]  # seeded
    resumed = make_search(spec)
    resumed.observe(proposals[0], 0.5)  # a trial finished by an earlier run of the sweep
    assert resumed.study.best_value == 0.5


def test_trial_options_and_assignments() -> None:
    spec = load_spec(spec_dict(base_options={"train_cfg.max_iters": 5, "preset": "x"}))
    params = {"preset": "tiny/proposers/gt", "legacy_roi": "on", "model.selector.top_k": 8}
    assert trial_options(spec, params) == {
        "train_cfg.max_iters": 5,
        "preset": "tiny/proposers/gt",
        "model.selector.top_k": 8,
        **LEGACY_ON,
    }
    args = ["preset=tiny/proposers/gt", "legacy_roi=on", "model.selector.top_k=8"]
    assert parse_assignments(spec, args) == params
    assert parse_assignments(spec, ["--model.selector.nms_thr=0.5"]) == {
        "model.selector.nms_thr": 0.5
    }
    for bad in ("legacy_roi=maybe", "model.selector.top_k=100", "nope=1", "preset"):
        with pytest.raises(SweepSpecError, match="--trial"):
            parse_assignments(spec, [bad])


def test_wandb_sweep_config_is_the_equivalent_sweep() -> None:
    spec = load_spec(spec_dict(wandb={"project": "proj"}))
    config = wandb_sweep_config(spec, "configs/sweeps/x.yaml", "work_dirs/sweeps/x")
    yaml.safe_load(yaml.safe_dump(config))  # plain YAML types only
    assert config["method"] == "random" and config["program"] == "tools/sweep.py"
    assert config["metric"] == {"name": "test/rec/acc@0.5", "goal": "maximize"}
    assert config["project"] == "proj" and config["run_cap"] == 8
    params = config["parameters"]
    assert params["preset"] == {"values": ["tiny/proposers/gt", "tiny/proposers/detr"]}
    assert params["legacy_roi"] == {"values": ["off", "on"]}
    assert params["model.selector.nms_thr"] == {"distribution": "uniform", "min": 0.3, "max": 0.9}
    assert params["model.selector.top_k"]["distribution"] == "q_log_uniform_values"
    assert config["command"][3:] == [
        "configs/sweeps/x.yaml",
        "--work-dir",
        "work_dirs/sweeps/x",
        "--trial",
        "${args_no_hyphens}",
    ]
    assert wandb_sweep_config(load_spec(spec_dict(method="optuna")), "s", "d")["method"] == "bayes"


def test_results_table_best_first_failed_last(tmp_path: Path) -> None:
    spec = load_spec(spec_dict(metric={"name": "rec/acc@0.5", "report": ["rec/ceiling"]}))
    rows = [("ok", 0.2), ("failed", None), ("ok", 0.7)]
    for i, (status, acc) in enumerate(rows):
        (tmp_path / f"trial_{i:03d}").mkdir()
        metrics = {} if acc is None else {"rec/acc@0.5": acc, "rec/ceiling": 1.0}
        result = {
            "trial": f"trial_{i:03d}",
            "params": {"model.selector.nms_thr": 0.5 + i},
            "status": status,
            "metrics": metrics,
            "seconds": 3.0,
            "error": "ValueError: boom\ntraceback" if acc is None else None,
        }
        (tmp_path / f"trial_{i:03d}" / "result.json").write_text(json.dumps(result))
    results, table = write_results(spec, tmp_path)
    assert [r["trial"] for r in results] == ["trial_002", "trial_000", "trial_001"]
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["rec/acc@0.5"] for r in csv_rows] == ["0.7", "0.2", ""]
    assert csv_rows[2]["error"] == "ValueError: boom"
    header = (
        "| trial | status | preset | nms_thr | top_k | legacy_roi | rec/acc@0.5 | rec/ceiling |"
    )
    assert header in table
    assert "- trial_001: ValueError: boom" in table
    assert (tmp_path / "results.md").read_text().endswith(table)


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B offline ``.wandb`` file (LevelDB-log framing of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, payload = path.read_bytes(), 7, b""  # 7-byte ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = payload + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_a_trial_that_raises_is_recorded_as_failed(tmp_path: Path) -> None:
    job = {
        "sweep": "unit",
        "trial": "trial_000",
        "params": {"model.layout": "bogus"},
        "options": {"model.layout": "bogus"},  # passes the key check; GromaPX refuses it
        "config": str(Path(TINY).resolve()),
        "data": None,
        "wandb": None,
    }
    (tmp_path / "trial.json").write_text(json.dumps(job))
    result = execute_trial(tmp_path)
    assert result["status"] == "failed" and result["metrics"] == {}
    assert result["error"].startswith("ValueError: layout must be one of")
    assert json.loads((tmp_path / "result.json").read_text()) == result


def test_a_crashed_trial_process_is_recorded_with_its_output(tmp_path: Path) -> None:
    def crash() -> None:  # dies without a result.json, as a segfault or OOM kill would
        (tmp_path / "trial.log").write_text("some output\n")
        os._exit(3)

    process = multiprocessing.get_context("fork").Process(target=crash)
    process.start()
    process.join()
    run = _Running(0, tmp_path, {"a": 1}, process, time.perf_counter())
    result = _collect(run, timed_out=False)
    assert result["status"] == "failed" and result["params"] == {"a": 1}
    assert result["error"] == "trial process exited with code 3\nsome output"
    assert json.loads((tmp_path / "result.json").read_text()) == result


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path: Path) -> None:
    raw = {
        "name": "e2e",
        "config": TINY,
        "data": {"num_train": 8, "num_val": 4, "num_test": 4},
        "base_options": {
            "train_cfg.max_iters": 2,
            "default_hooks.checkpoint": None,  # no checkpoint to write
            "test_evaluator": [{"type": "RECMetric"}],
        },
        "parameters": {
            "model.layout": ["pair", "fused"],
            "queries": {"choices": {"default": {}, "eight": {"model.proposer.num_queries": 8}}},
            "proposer": {"choices": {"tiny": {}, "gt": {"preset": "tiny/proposers/gt"}}},
        },
        "method": "grid",
        # pair x {default, eight} x {tiny, gt}, then fused-default-tiny; pair-eight-gt fails:
        # the ground-truth proposer has no num_queries (each value alone builds).
        "num_trials": 5,
        "parallel": 2,
        "wandb": {"project": "sweep-test", "group": "e2e-group", "mode": "offline"},
    }
    lines: list[str] = []
    sweep = Sweep(load_spec(raw), tmp_path, echo=lines.append)
    results = sweep.run()

    assert [r["status"] for r in results] == ["ok"] * 4 + ["failed"]
    assert results[-1]["trial"] == "trial_003"
    assert "model.proposer has no key 'num_queries'" in results[-1]["error"]
    assert sum("done in" in line for line in lines) == 4 and any("FAILED" in x for x in lines)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["rec/acc@0.5"] != "" for r in rows[:4])
    md = (tmp_path / "results.md").read_text()
    assert md.count("| ok |") == 4 and md.count("| failed |") == 1
    assert (tmp_path / "wandb_sweep.yaml").is_file()

    for result in results[:4]:  # each trial is an offline W&B run in the group, with its params
        (run_file,) = Path(result["wandb_run"]["dir"]).glob("run-*.wandb")
        assert run_file.is_relative_to(tmp_path / result["trial"])
        (run,) = [r.run for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert run.run_group == "e2e-group" and run.display_name == f"e2e/{result['trial']}"
        assert {k: config[k] for k in result["params"]} == result["params"]

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("trial_*/result.json")}
    lines.clear()
    again = Sweep(load_spec(raw), tmp_path, echo=lines.append).run()  # resume: nothing to run
    assert "5 already done" in lines[0] and not any("started" in x for x in lines)
    assert [r["trial"] for r in again] == [r["trial"] for r in results]
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("trial_*/result.json")}
