"""Training throughput of the tiny GromaPX pipeline at 1 and 2 processes. Prints a table, writes
JSON.

    python benchmarks/bench_train.py [--iters 30] [--batch 2] [--nprocs 1 2]

Each run is ``tools/train.py`` on ``configs/tiny/groma-px_tiny.py`` (synthetic data generated
into a temporary directory), launched with ``torchrun --nproc_per_node N`` for N > 1 (gloo on
CPU, NCCL on CUDA), ``--batch`` samples per process. From rank 0's per-iteration ``time`` and
``data_time`` (mmengine's ``IterTimerHook``, in ``vis_data/scalars.json``), after ``--warmup``
iterations:

- samples/s: ``N * batch`` samples per iteration over the mean iteration time;
- data share: the share of the step time spent waiting for the next batch (``data_time``);
- peak memory: each process's peak resident set (``ru_maxrss``), and on CUDA the peak of
  ``torch.cuda.max_memory_allocated``, the largest over ranks (a hook writes them at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groma_px.engine import tiny_runs  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_train.json"

MEMORY_HOOK = textwrap.dedent(
    """
    import json
    import resource
    from pathlib import Path

    import torch
    from mmengine.dist import get_rank
    from mmengine.hooks import Hook

    from groma_px.registry import HOOKS


    @HOOKS.register_module()
    class PeakMemoryHook(Hook):
        # Writes this rank's peak RSS (and CUDA peak) to peak_memory_rank{r}.json at the end.
        def after_run(self, runner):
            cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
            out = {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "cuda_max_allocated_mib": cuda / 2**20}
            path = Path(runner.work_dir) / f"peak_memory_rank{get_rank()}.json"
            path.write_text(json.dumps(out))
    """
)


def run_once(root: Path, config: Path, nproc: int, args: argparse.Namespace) -> dict:
    """One training run; its throughput, data share and peak memory."""
    work = root / f"nproc{nproc}"
    start = time.perf_counter()
    tiny_runs.run_tool(
        "train",
        [str(config), "--work-dir", str(work), "--cfg-options"]
        + [f"train_dataloader.batch_size={args.batch}"],
        nproc=nproc,
        extra_pythonpath=[root / "hooks"],
        timeout=1800,
    )
    wall = time.perf_counter() - start
    rows = [r for r in tiny_runs.read_scalars(work) if "loss" in r and r["iter"] > args.warmup]
    step = [r["time"] for r in rows]
    data = [r["data_time"] for r in rows]
    peaks = [json.loads(p.read_text()) for p in sorted(work.glob("peak_memory_rank*.json"))]
    return {
        "processes": nproc,
        "batch_per_process": args.batch,
        "global_batch": nproc * args.batch,
        "measured_iters": len(rows),
        "samples_per_s": nproc * args.batch * len(step) / sum(step),
        "step_seconds_mean": statistics.mean(step),
        "step_seconds_median": statistics.median(step),
        "data_seconds_mean": statistics.mean(data),
        "data_share_of_step": sum(data) / sum(step),
        "peak_rss_mib_per_process": max(p["max_rss_mib"] for p in peaks),
        "peak_cuda_mib_per_process": max(p["cuda_max_allocated_mib"] for p in peaks),
        "wall_seconds_incl_startup": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=30, help="training iterations per run")
    parser.add_argument("--warmup", type=int, default=5, help="first iterations not measured")
    parser.add_argument("--batch", type=int, default=2, help="samples per process")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-train", type=int, default=64, help="synthetic training images")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        workspace = tiny_runs.make_workspace(root, num_train=args.num_train)
        (root / "hooks").mkdir()
        (root / "hooks" / "peak_memory_hook.py").write_text(MEMORY_HOOK)
        config = tiny_runs.write_config(
            root / "tiny.py",
            workspace,
            options={
                "train_cfg.max_iters": args.iters,
                "default_hooks.checkpoint.interval": args.iters,
            },
            additions={
                "custom_imports": dict(imports=["groma_px.engine", "peak_memory_hook"]),
                "custom_hooks": [dict(type="PeakMemoryHook")],
                # the mask head gets no gradient on a rank whose batch cites no mask
                "find_unused_parameters": True,
            },
            deterministic=False,  # the tiny pipeline as it trains
        )
        runs = [run_once(root, config, n, args) for n in args.nprocs]
    result = {
        "what": "tiny GromaPX training throughput (tools/train.py) at 1 and N processes",
        "config": "configs/tiny/groma-px_tiny.py",
        "device": "cuda" if torch.cuda.is_available() else "cpu (gloo)",
        "cpu_count": os.cpu_count(),
        "threads_per_process": 1,
        "machine": platform.platform(),
        "iters": args.iters,
        "warmup": args.warmup,
        "runs": runs,
    }
    print(
        f"\ntiny GromaPX training, {args.iters} iterations ({args.warmup} warm-up), 1 thread each"
    )
    header = f"  {'procs':>5} {'batch':>6} {'samples/s':>10} {'step s':>8} {'data share':>11}"
    print(header + f" {'peak RSS MiB':>13}")
    for r in runs:
        print(
            f"  {r['processes']:>5} {r['global_batch']:>6} {r['samples_per_s']:>10.2f} "
            f"{r['step_seconds_mean']:>8.4f} {r['data_share_of_step']:>11.1%} "
            f"{r['peak_rss_mib_per_process']:>13.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
