"""Train any groma-px / region_proposer config with an mmengine Runner.

python tools/train.py CONFIG [--work-dir DIR] [--cfg-options k=v ...] [--resume [CKPT]]
torchrun --nproc_per_node N tools/train.py CONFIG --launcher pytorch   # or tools/dist_train.sh
srun -n N python tools/train.py CONFIG --launcher slurm
FSDP/DeepSpeed: ``runner_type``/``strategy`` in the config (docs/distributed.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmengine.config import Config, DictAction

from region_proposer.runtime import (
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
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from CKPT, or from the latest checkpoint in the work dir",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    patch_checkpoint_loader()
    with distributed_session(args.launcher):
        train(args)


def train(args: argparse.Namespace) -> None:
    cfg = Config.fromfile(args.config)
    apply_cfg_options(cfg, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = (
        args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    )
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    configure_for_device(cfg)
    build_runner(cfg).train()


if __name__ == "__main__":
    main()
