"""Running a sweep locally: trial processes, several at once, skipped when finished, with
progress lines and the results table at the end."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mmengine.config import Config
from mmengine.registry import Registry

from ...data.synthetic import generate_dataset
from ...llm.tokenizer import build_tokenizer_from_jsonl
from ...llm.vocab import GroundingVocab
from .results import fmt, metric_value, short_names, write_results
from .search import GridSearch, make_search
from .spec import (
    DATA_DEFAULTS,
    SweepSpec,
    SweepSpecError,
    parse_assignments,
    wandb_sweep_config,
)
from .trial import build_trial_config, execute_trial, trial_options, write_json


def _num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _preload(cfg: Config, *, with_wandb: bool) -> None:
    """Imports once, in the sweep process, what each forked trial would import again: the
    modules behind the config's registries and ``custom_imports``, and the part of wandb that
    ``wandb.init`` loads (together ~5 s of CPU per trial of the tiny config, measured)."""
    scope = cfg.get("default_scope")
    if scope and importlib.util.find_spec(f"{scope}.registry") is not None:
        for registry in vars(importlib.import_module(f"{scope}.registry")).values():
            if isinstance(registry, Registry):
                registry.import_from_location()
    for name in (cfg.get("custom_imports") or {}).get("imports", []):
        importlib.import_module(name)
    if with_wandb:
        importlib.import_module("wandb.sdk.launch")  # wandb.init imports it: 2.5 s


@dataclass
class _Running:
    index: int | None
    dir: Path
    params: dict[str, Any]
    process: multiprocessing.process.BaseProcess
    start: float


def _trial_process(trial_dir: str, threads: int) -> None:
    """A trial process: output to ``trial.log``, ``threads`` intra-op threads, then the trial."""
    log = open(Path(trial_dir) / "trial.log", "w", buffering=1)  # noqa: SIM115 (exits after)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(log.fileno(), 1)  # native (OpenMP, wandb-core) output too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(0 if execute_trial(trial_dir)["status"] == "ok" else 1)


def _launch(job: dict[str, Any], trial_dir: Path, index: int | None) -> _Running:
    """Starts a trial process. It is forked where the OS can (Linux): torch, transformers and
    mmengine are imported already, which saves each trial ~8 s of CPU (measured); elsewhere it
    is spawned and imports them itself."""
    write_json(trial_dir / "trial.json", job)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    process = context.Process(target=_trial_process, args=(str(trial_dir), job["threads"]))
    process.start()
    return _Running(index, trial_dir, job["params"], process, time.perf_counter())


def _stop(run: _Running) -> None:
    """Kills a trial process (one this sweep started) unless it has exited."""
    if run.process.is_alive():
        run.process.kill()
    run.process.join()


def _collect(run: _Running, timed_out: bool) -> dict[str, Any]:
    """The result of a finished (or timed-out, then killed) trial process."""
    _stop(run)
    path = run.dir / "result.json"
    if path.is_file() and not timed_out:
        return json.loads(path.read_text())
    log = run.dir / "trial.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-12:] if log.is_file() else []
    why = "timed out" if timed_out else f"exited with code {run.process.exitcode}"
    result = {
        "trial": run.dir.name,
        "params": run.params,
        "status": "failed",
        "metrics": {},
        "error": f"trial process {why}\n" + "\n".join(tail),
        "seconds": round(time.perf_counter() - run.start, 2),
    }
    write_json(path, result)
    return result


class Sweep:
    """Runs a sweep's trials in ``sweep_dir``, ``parallel`` at a time, each with
    ``cores // parallel`` threads; trials with a ``result.json`` are skipped.

    Args:
        spec: The parsed spec.
        sweep_dir: Output directory: ``trial_<i>/``, ``results.{csv,md}``, ``wandb_sweep.yaml``,
            ``spec.yaml`` and, with a ``data:`` section, ``data/`` and ``tokenizer/``.
        spec_path: The spec file, for the W&B sweep's command. Defaults to the copy in
            ``sweep_dir``.
        parallel: Trials at once. Defaults to ``spec.parallel``.
        echo: Where progress lines go. Defaults to ``print``.
    """

    def __init__(
        self,
        spec: SweepSpec,
        sweep_dir: str | Path,
        *,
        spec_path: str | Path | None = None,
        parallel: int | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.spec, self.dir = spec, Path(sweep_dir)
        self.spec_path = spec_path or self.dir / "spec.yaml"
        self.slots = parallel or spec.parallel
        self.threads = max(1, _num_cores() // self.slots)
        self.echo = functools.partial(print, flush=True) if echo is print else echo
        self.wandb = spec.wandb
        self.data: dict[str, Any] | None = None
        self.finished = 0

    def prepare(self) -> None:
        """Writes ``spec.yaml`` and ``wandb_sweep.yaml``, generates the data if the spec asks,
        and builds a config for every categorical value and range end, so a misspelt key fails
        here, naming the parameter, before any trial runs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spec.yaml").write_text(yaml.safe_dump(self.spec.raw, sort_keys=False))
        config = wandb_sweep_config(self.spec, self.spec_path, self.dir)
        (self.dir / "wandb_sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.data = self._prepare_data()
        probes = [("base_options", {})]
        for p in self.spec.parameters:
            cast = int if p.kind == "int" else float
            values = p.labels if p.labels is not None else [cast(p.low), cast(p.high)]
            probes += [(f"parameters.{p.name}", {p.name: v}) for v in values]
        for where, params in probes:
            try:
                cfg = build_trial_config(self._job("probe", params), self.dir / "probe")
            except Exception as exc:
                raise SweepSpecError(f"{where}: {_message(exc)}") from exc
        _preload(cfg, with_wandb=self.spec.wandb is not None)

    def _prepare_data(self) -> dict[str, Any] | None:
        data = self.spec.data
        if data is None:
            return None
        if "data_root" in data or "tokenizer_dir" in data:
            if not {"data_root", "tokenizer_dir"} <= set(data):
                raise SweepSpecError("data: give both data_root: and tokenizer_dir:, or neither")
            return {k: data.get(k) for k in ("data_root", "tokenizer_dir", "num_region_tokens")}
        wanted = {**DATA_DEFAULTS, **data}
        out = {
            "data_root": str(self.dir.resolve() / "data"),
            "tokenizer_dir": str(self.dir.resolve() / "tokenizer"),
            "num_region_tokens": wanted["num_region_tokens"],
        }
        marker = self.dir / "data.json"
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            return out
        sizes = [wanted[k] for k in ("num_train", "num_val", "num_test")]
        self.echo(f"generating {'/'.join(map(str, sizes))} train/val/test images and a tokenizer")
        generate_dataset(out["data_root"], *sizes, seed=wanted["seed"])
        vocab = GroundingVocab(wanted["num_region_tokens"])
        build_tokenizer_from_jsonl(
            [self.dir / "data/train.jsonl"], out["tokenizer_dir"], vocab=vocab
        )
        write_json(marker, wanted)
        return out

    def _job(self, trial: str, params: Mapping[str, Any]) -> dict[str, Any]:
        spec = self.spec
        return {
            "sweep": spec.name,
            "trial": trial,
            "params": dict(params),
            "options": trial_options(spec, params),
            "config": str(spec.config),
            "data": self.data,
            "validate": spec.validate,
            "wandb": self.wandb,
            "threads": self.threads,
        }

    def _start(self, trial_dir: Path, index: int | None, params: dict) -> _Running | dict:
        """Launches a trial; a config that does not build is a failed result at once."""
        if trial_dir.exists():  # an interrupted or retried trial starts afresh
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        job = self._job(trial_dir.name, params)
        try:
            build_trial_config(job, trial_dir)
        except Exception as exc:
            result = {
                "trial": trial_dir.name,
                "params": params,
                "options": job["options"],
                "status": "failed",
                "metrics": {},
                "seconds": 0.0,
                "error": f"config: {type(exc).__name__}: {_message(exc)}",
            }
            write_json(trial_dir / "result.json", result)
            return result
        self.echo(f"{trial_dir.name} started: {self._describe(params)}")
        return _launch(job, trial_dir, index)

    def _describe(self, params: Mapping[str, Any]) -> str:
        short = short_names(self.spec)
        return " ".join(f"{short[k]}={fmt(v)}" for k, v in params.items())

    def _report(self, result: dict, total: int | None = None) -> None:
        """A progress line: ``trial 3/6 trial_002 done in 41 s, rec/acc@0.5=0.1200``."""
        self.finished += 1
        count = f"{self.finished}/{total or self.spec.total_trials}"
        seconds = result.get("seconds") or 0
        if result["status"] == "ok":
            value = metric_value(self.spec, result)
            shown = "missing" if value is None else f"{value:.4f}"
            line = f"done in {seconds:.0f} s, {self.spec.metric}={shown}"
        else:
            line = f"FAILED in {seconds:.0f} s: {(result.get('error') or '').splitlines()[0]}"
        self.echo(f"trial {count} {result['trial']} {line}")

    def run(self, *, retry_failed: bool = False) -> list[dict]:
        """Runs every trial not finished yet, then writes and prints the results table.

        Args:
            retry_failed: Run failed trials again too. Defaults to False.

        Returns:
            All trial results, best first.
        """
        self.prepare()
        spec, search = self.spec, make_search(self.spec)
        done = self._resume(search, retry_failed)
        self.echo(
            f"sweep {spec.name}: {spec.total_trials} trials ({spec.method}), {len(done)} already "
            f"done; {self.slots} at once, {self.threads} thread(s) each -> {self.dir}"
        )
        pending = [i for i in range(spec.total_trials) if i not in done]
        running: list[_Running] = []
        try:
            while pending or running:
                while pending and len(running) < self.slots:
                    i = pending.pop(0)
                    started = self._start(self.dir / f"trial_{i:03d}", i, search.propose(i))
                    if isinstance(started, dict):  # its config did not build
                        search.tell(i, None)
                        self._report(started)
                    else:
                        running.append(started)
                for run in [r for r in running if self._over(r)]:
                    running.remove(run)
                    result = _collect(run, timed_out=run.process.is_alive())
                    search.tell(run.index, metric_value(spec, result))
                    self._report(result)
                time.sleep(0.2)
        finally:
            for run in running:  # interrupted: stop our trial processes; they rerun next time
                _stop(run)
        return self._table()

    def _resume(self, search: GridSearch, retry_failed: bool) -> dict[int, dict]:
        """The finished trials (with ``retry_failed``: the successful ones), told to the search;
        grid and random trials must still have the parameters the spec proposes."""
        done = {}
        for i in range(self.spec.total_trials):
            path = self.dir / f"trial_{i:03d}" / "result.json"
            if path.is_file():
                result = json.loads(path.read_text())
                if result["status"] == "ok" or not retry_failed:
                    done[i] = result
        for i, result in done.items():
            if self.spec.method == "optuna":
                search.observe(result["params"], metric_value(self.spec, result))
            elif search.propose(i) != result["params"]:
                raise SweepSpecError(
                    f"{self.dir}/trial_{i:03d} ran {result['params']} but the spec now proposes "
                    f"{search.propose(i)}: use another --work-dir for a changed spec"
                )
        self.finished = len(done)
        return done

    def _over(self, run: _Running) -> bool:
        """Whether a trial process has exited or run past ``trial_timeout``."""
        limit = self.spec.trial_timeout
        return not run.process.is_alive() or bool(limit and time.perf_counter() - run.start > limit)

    def run_one(self, assignments: list[str]) -> dict:
        """Single-trial mode (``--trial key=value ...``, as ``wandb agent`` calls it): runs one
        trial in ``trial_wandb_<run id>`` (under an agent) or ``trial_manual_<hash>``."""
        params = parse_assignments(self.spec, assignments)
        self.prepare()
        run_id = os.environ.get("WANDB_RUN_ID")
        if os.environ.get("WANDB_SWEEP_ID") and self.wandb:  # under `wandb agent`: report back
            self.wandb = {**self.wandb, "mode": "online"}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        trial_dir = self.dir / (f"trial_wandb_{run_id}" if run_id else f"trial_manual_{digest}")
        if (trial_dir / "result.json").is_file():
            self.echo(f"{trial_dir.name} already done")
            return json.loads((trial_dir / "result.json").read_text())
        started = self._start(trial_dir, None, params)
        if not isinstance(started, dict):
            started.process.join()
            started = _collect(started, timed_out=False)
        self._report(started, total=1)
        self._table()
        return started

    def _table(self) -> list[dict]:
        results, table = write_results(self.spec, self.dir)
        self.echo(
            f"\nresults ({self.spec.metric}, {self.spec.goal}) -> {self.dir}/results.csv, "
            f"results.md\n{table}"
        )
        return results
