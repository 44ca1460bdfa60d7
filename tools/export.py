"""Export a training checkpoint of a groma-px config to a model directory for inference.

python tools/export.py CONFIG CHECKPOINT OUT_DIR [--cfg-options k=v ...]

OUT_DIR gets model.safetensors, config.py and tokenizer/ (groma_px/inference/export.py), which
``GroundedChat.from_pretrained(OUT_DIR)`` and ``tools/chat.py --checkpoint OUT_DIR`` load. The
checkpoint must match the config: a mismatch fails, naming the missing and unexpected keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import DefaultScope

from groma_px.inference.export import export_pretrained, load_state_dict_strict
from groma_px.registry import MODELS
from region_proposer.runtime import apply_cfg_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", help="the config the checkpoint was trained with")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train.py")
    parser.add_argument("out_dir", help="export directory (replaced if it exists)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    apply_cfg_options(cfg, args.cfg_options)
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope", "groma_px")):
        model = MODELS.build(cfg.model)
    # weights_only=False: mmengine's own training checkpoints hold HistoryBuffer objects
    # (region_proposer/runtime.py, fix 1); never use this on files from elsewhere.
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    load_state_dict_strict(model, state, source=args.checkpoint)
    cfg.test_pipeline = cfg.test_dataloader.dataset.pipeline
    out = export_pretrained(model.eval(), cfg, args.out_dir)
    print(f"exported {args.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    main()
