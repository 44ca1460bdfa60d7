"""Evaluate a checkpoint of any groma-px / region_proposer config; print and save the metrics.

python tools/test.py CONFIG CHECKPOINT [--out metrics.json] [--work-dir DIR] [--cfg-options k=v]
torchrun --nproc_per_node N tools/test.py CONFIG CHECKPOINT --launcher pytorch  # same metrics
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process

from region_proposer.runtime import (
    StrictLoadHook,
    apply_cfg_options,
    build_runner,
    configure_for_device,
    distributed_session,
    patch_checkpoint_loader,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", help="mmengine config file")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train.py")
    parser.add_argument("--out", help="write the metrics as a flat JSON dict to this file")
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    patch_checkpoint_loader()
    with distributed_session(args.launcher):
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    cfg = Config.fromfile(args.config)
    apply_cfg_options(cfg, args.cfg_options)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    cfg.launcher, cfg.load_from, cfg.resume = args.launcher, args.checkpoint, False
    cfg.work_dir = (
        args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    )
    configure_for_device(cfg)
    runner = build_runner(cfg)
    runner.register_hook(StrictLoadHook())  # missing weights fail, naming the keys
    metrics = runner.test()
    if not is_main_process():
        return metrics
    width = max((len(k) for k in metrics), default=0)
    for key, value in sorted(metrics.items()):
        print(
            f"{key:<{width}}  {value:.4f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    if args.out:
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        print(f"metrics -> {args.out}")
    return metrics


if __name__ == "__main__":
    main()
