"""Ablation sweeps over config presets and scalars, trials run locally (docs/sweeps.md).

    python tools/sweep.py configs/sweeps/tiny_ablation.yaml --work-dir work_dirs/sweeps/tiny
    python tools/sweep.py SPEC.yaml --trial model.layout=fused preset=tiny/proposers/gt
    python tools/sweep.py SPEC.yaml --wandb-sweep-config sweep.yaml   # then: wandb sweep ...

Runs the trials of SPEC (grid, random or optuna search; several at once with ``parallel``),
skipping those already finished in the work dir, and writes ``results.csv`` / ``results.md``
there. ``--trial`` runs one trial with the given parameters (what ``wandb agent`` calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from groma_px.engine.sweep import Sweep, SweepSpecError, load_spec, wandb_sweep_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="sweep spec (YAML)")
    parser.add_argument("--work-dir", "--out", help="defaults to work_dirs/sweeps/<name>")
    parser.add_argument("--parallel", type=int, help="trials at once (overrides the spec)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed trials too")
    parser.add_argument(
        "--trial", nargs="*", metavar="NAME=VALUE", help="run one trial with these parameters"
    )
    parser.add_argument(
        "--wandb-sweep-config", metavar="OUT", help="write the W&B sweep config and exit"
    )
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        work_dir = Path(args.work_dir or f"work_dirs/sweeps/{spec.name}")
        if args.wandb_sweep_config:
            config = wandb_sweep_config(spec, args.spec, work_dir)
            Path(args.wandb_sweep_config).write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"W&B sweep config -> {args.wandb_sweep_config} (wandb sweep needs a server)")
            return 0
        sweep = Sweep(spec, work_dir, spec_path=args.spec, parallel=args.parallel)
        if args.trial is not None:
            return 0 if sweep.run_one(args.trial)["status"] == "ok" else 1
        results = sweep.run(retry_failed=args.retry_failed)
    except SweepSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
