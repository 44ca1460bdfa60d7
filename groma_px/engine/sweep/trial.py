"""One trial: its config (the sweep's cfg-options applied and checked), and its process, which
trains, tests and writes ``result.json`` (``python -m groma_px.engine.sweep TRIAL_DIR``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config

from region_proposer.runtime import (
    apply_cfg_options,
    build_runner,
    configure_for_device,
    patch_checkpoint_loader,
)

from ..stages import chat_config
from .spec import SweepSpec


def trial_options(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """``base_options`` updated with the cfg-options of each parameter value."""
    options = dict(spec.base_options)
    for p in spec.parameters:
        if p.name in params:
            options.update(p.options(params[p.name]))
    return options


def build_trial_config(job: Mapping[str, Any], work_dir: str | Path) -> Config:
    """The config of one trial (``job`` as written to ``trial.json``): data root and tokenizer
    (if the sweep has data), cfg-options checked by ``apply_cfg_options``, work dir, and a W&B
    run in the sweep's group that carries the trial's parameters."""
    cfg = Config.fromfile(job["config"])
    if job.get("data"):
        data = job["data"]
        cfg = chat_config(
            job["config"],
            data_root=data["data_root"],
            tokenizer_dir=data["tokenizer_dir"],
            work_dir=work_dir,
            load_from=cfg.get("load_from"),
            num_region_tokens=data.get("num_region_tokens"),
        )
    apply_cfg_options(cfg, job["options"])
    if not job.get("validate", False):  # the metric comes from the test split
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.work_dir, cfg.launcher = str(work_dir), "none"
    configure_for_device(cfg)
    cfg.experiment_name = f"{job['sweep']}_{job['trial']}_{time.time_ns()}"
    visualizer = cfg.get("visualizer") or dict(type="Visualizer")
    # The sweep's W&B run replaces any the config has; `wandb: false` leaves none.
    backends = [b for b in visualizer.get("vis_backends", []) if "Wandb" not in b["type"]]
    if job.get("wandb"):
        init_kwargs = dict(
            project=job["wandb"].get("project", "groma-px-sweeps"),
            group=job["wandb"].get("group", job["sweep"]),
            name=f"{job['sweep']}/{job['trial']}",
            job_type="sweep-trial",
            mode=job["wandb"].get("mode", "offline"),
            dir=str(work_dir),
            config={"sweep": job["sweep"], "trial": job["trial"], **job["params"]},
        )
        backends.append(dict(type="WandbVisBackend", init_kwargs=init_kwargs))
    cfg.visualizer = dict(visualizer, vis_backends=backends)
    return cfg


@contextlib.contextmanager
def _no_code_artifact() -> Iterator[None]:
    """Makes ``wandb.Run.log_code`` a no-op while a trial runs (in its own process).

    mmengine's ``WandbVisBackend.add_config`` calls ``run.log_code()`` on the working directory:
    wandb hashes and stages every ``*.py`` file under it, with the repo's venv about 15,000
    files, 40 s and 270 MB in ``~/.local/share/wandb`` per run (measured, wandb 0.31). A trial is
    described by its config, which is logged as the run config anyway.
    """
    from wandb.sdk.wandb_run import Run

    original = Run.log_code
    Run.log_code = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Run.log_code = original


def _train_and_test(runner: Any) -> tuple[dict[str, float], dict[str, str] | None]:
    """Trains and tests; logs the test metrics as ``test/<metric>`` to the same visualizer
    (hence W&B run). Returns the metrics and the W&B run's id and directory."""
    visualizer = runner.visualizer
    # LoggerHook.after_run closes the visualizer (W&B: finishes the run) when train() ends;
    # defer that to the end of the trial so the test metrics land in the same run.
    visualizer.close = lambda: None
    try:
        runner.train()
        metrics = {k: float(v) for k, v in runner.test().items()}
        visualizer.add_scalars({f"test/{k}": v for k, v in metrics.items()})
        backend = visualizer.get_backend("WandbVisBackend")
        run = backend.experiment.run if backend is not None else None
        info = None if run is None else {"id": run.id, "dir": str(Path(run.dir).parent)}
    finally:
        del visualizer.close  # back to the class's method
        visualizer.close()
    return metrics, info


def execute_trial(trial_dir: str | Path) -> dict[str, Any]:
    """Runs the trial described by ``TRIAL_DIR/trial.json`` in this process: builds its config,
    trains, tests, and writes ``TRIAL_DIR/result.json`` (params, options, metrics, status,
    error, seconds, W&B run). Exceptions are recorded, not raised."""
    trial_dir = Path(trial_dir)
    job = json.loads((trial_dir / "trial.json").read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    result = {k: job[k] for k in ("trial", "params", "options")}
    result.update(status="failed", metrics={}, error=None, wandb_run=None)
    start = time.perf_counter()
    try:
        patch_checkpoint_loader()
        with _no_code_artifact() if job.get("wandb") else contextlib.nullcontext():
            runner = build_runner(build_trial_config(job, trial_dir))
            result["metrics"], result["wandb_run"] = _train_and_test(runner)
        result["status"] = "ok"
    except Exception as exc:  # a failed trial is a result, not the end of the sweep
        tail = traceback.format_exc().strip().splitlines()[-12:]
        result["error"] = f"{type(exc).__name__}: {exc}\n" + "\n".join(tail)
        _finish_wandb_run()
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json(trial_dir / "result.json", result)
    return result


def _finish_wandb_run() -> None:
    """Finishes a W&B run a failed trial left open: its offline file is then complete, even
    though a forked trial process exits without running ``atexit`` handlers."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON atomically."""
    tmp = path.with_suffix(".tmp")  # a half-written result.json would mark the trial finished
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
