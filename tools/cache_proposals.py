"""Runs a trained stage-1 proposer over one split and writes its proposals to a safetensors cache.

    python tools/cache_proposals.py CONFIG CHECKPOINT --out FILE [--split val] [--cfg-options ...]

CONFIG is a stage-1 config whose ``model`` is a ``ProposerPretrainer``; the split's dataloader is
used as configured. Read the file back with ``CachedProposer(path=FILE)``. Single process.
"""

from __future__ import annotations

import argparse
import os.path as osp
from collections.abc import Iterator

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner
from torch import Tensor
from torch.utils.data import DataLoader

from region_proposer.proposers.cached import config_hash, write_proposal_cache
from region_proposer.runtime import apply_cfg_options, patch_checkpoint_loader


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="stage-1 config (model = ProposerPretrainer)")
    parser.add_argument("checkpoint", help="trained stage-1 checkpoint")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--work-dir", help="runner work dir (logs)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    return parser.parse_args()


def iter_proposals(
    model: torch.nn.Module, loader: DataLoader
) -> Iterator[tuple[str, Tensor, Tensor, Tensor | None]]:
    """Yields ``(sample_id, boxes, scores, embeddings)`` of the valid proposals of each sample."""
    model.eval()
    with torch.no_grad():
        for step, data in enumerate(loader, start=1):
            sample_ids, proposals = model.extract_proposals(data)
            if step % 20 == 0 or step == len(loader):
                print(f"  batch {step}/{len(loader)}", flush=True)
            for i, sample_id in enumerate(sample_ids):
                keep = proposals.valid[i]
                embeddings = proposals.embeddings
                yield (
                    sample_id,
                    proposals.boxes[i][keep],
                    proposals.scores[i][keep],
                    None if embeddings is None else embeddings[i][keep],
                )


def main() -> None:
    args = parse_args()
    patch_checkpoint_loader()
    cfg = Config.fromfile(args.config)
    apply_cfg_options(cfg, args.cfg_options)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("work_dirs", name)
    cfg.load_from = None  # the checkpoint is loaded explicitly below
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(args.checkpoint, map_location="cpu")
    model = getattr(runner.model, "module", runner.model)  # unwrap a DDP wrapper, if any
    loader = Runner.build_dataloader(cfg[f"{args.split}_dataloader"])
    proposer_cfg = cfg.model.proposer.to_dict()
    write_proposal_cache(
        args.out,
        iter_proposals(model, loader),
        config_hash=config_hash(proposer_cfg),
        proposer=str(proposer_cfg["type"]),
        extra_metadata={"checkpoint": osp.abspath(args.checkpoint), "split": args.split},
    )
    print(f"wrote {args.out} (config hash {config_hash(proposer_cfg)})")


if __name__ == "__main__":
    main()
