"""The main job on the embedded default: synthetic grounded scenes end to end.

    python tools/quickstart.py --work-dir work_dirs/quickstart

Today's pipeline (stages that exist so far): generate the synthetic grounded-scenes dataset,
validate every record through ``GroundedConversationDataset``, train the byte-level BPE tokenizer
with the grounding tokens, draw one preview per task, then train the stage-1 region proposer
(``configs/proposer/ddetr_vit-tiny_2k_synthetic.py``) with an mmengine Runner, evaluate its
proposal recall on the test split and draw its region sets. Writes ``WORK_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

from groma_px.data import GroundedConversationDataset
from groma_px.data.synthetic import generate_dataset
from groma_px.llm.tokenizer import build_tokenizer_from_jsonl
from groma_px.llm.vocab import GroundingVocab
from groma_px.visualization import draw_record
from region_proposer.runtime import apply_cfg_options, patch_checkpoint_loader
from region_proposer.visualization import draw_proposals

SPLITS = ("train", "val", "test")
STAGE1_CONFIG = (
    Path(__file__).resolve().parents[1] / "configs/proposer/ddetr_vit-tiny_2k_synthetic.py"
)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _load_splits(data_root: Path) -> dict[str, GroundedConversationDataset]:
    return {
        split: GroundedConversationDataset(ann_file=f"{split}.jsonl", data_root=str(data_root))
        for split in SPLITS
    }


def _print_table(datasets: dict[str, GroundedConversationDataset]) -> dict[str, dict[str, int]]:
    tasks: dict[str, Counter] = {}
    for split, ds in datasets.items():
        tasks[split] = Counter(ds.get_data_info(i)["task"] for i in range(len(ds)))
    names = sorted(set().union(*tasks.values()))
    print(f"{'split':<6} {'images':>6} " + " ".join(f"{n:>16}" for n in names))
    for split, ds in datasets.items():
        images = len({ds.get_data_info(i)["image"] for i in range(len(ds))})
        print(f"{split:<6} {images:>6} " + " ".join(f"{tasks[split][n]:>16}" for n in names))
    return {split: dict(counter) for split, counter in tasks.items()}


def _write_previews(ds: GroundedConversationDataset, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written, seen = [], set()
    for i in range(len(ds)):
        record = ds.get_data_info(i)
        if record["task"] in seen:
            continue
        seen.add(record["task"])
        path = out_dir / f"{record['task']}.png"
        draw_record(record, ds.data_root).save(path)
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        print(f"  {path.name}: Q: {question.replace(chr(10), ' ')!r}  A: {answer!r}")
        written.append(str(path))
    return written


def _train_stage1(data_root: Path, work_dir: Path, iters: int | None) -> tuple[dict, list[str]]:
    """Trains and tests the stage-1 proposer; returns test metrics and region-set pictures."""
    patch_checkpoint_loader()
    cfg = Config.fromfile(str(STAGE1_CONFIG))
    options = {f"{split}_dataloader.dataset.data_root": str(data_root) for split in SPLITS}
    if iters is not None:
        options.update(
            {
                "train_cfg.max_iters": iters,
                "train_cfg.val_interval": iters,
                "param_scheduler.1.milestones": [int(iters * 0.8)],
            }
        )
    apply_cfg_options(cfg, options)
    cfg.work_dir = str(work_dir)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    selection = cfg.get("region_selection", {})
    pictures = draw_proposals(
        runner.model, runner.test_dataloader, work_dir / "region_sets", num_images=4, **selection
    )
    return {k: float(v) for k, v in metrics.items()}, [str(p) for p in pictures]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--num-region-tokens", type=int, default=100)
    parser.add_argument(
        "--stage1-iters",
        type=int,
        default=None,
        help="stage-1 training iterations (default: the config's)",
    )
    args = parser.parse_args(argv)
    work_dir, timings = Path(args.work_dir), {}
    data_root = work_dir / "data"

    t = _step(f"1/5 generating synthetic grounded scenes -> {data_root}")
    gen = generate_dataset(
        data_root, args.num_train, args.num_val, args.num_test, args.seed, workers=args.workers
    )
    timings["generate_s"] = time.perf_counter() - t
    print(
        f"  {sum(s['images'] for s in gen['splits'].values())} images in "
        f"{gen['seconds']:.1f} s ({gen['images_per_second']:.0f} images/s, {args.workers} workers)"
    )

    t = _step("2/5 validating every record (GroundedConversationDataset)")
    datasets = _load_splits(data_root)
    records = _print_table(datasets)
    timings["validate_s"] = time.perf_counter() - t

    t = _step(f"3/5 training the tokenizer -> {work_dir / 'tokenizer'}")
    tokenizer = build_tokenizer_from_jsonl(
        [data_root / "train.jsonl"],
        work_dir / "tokenizer",
        vocab=GroundingVocab(args.num_region_tokens),
    )
    lengths = [
        len(tokenizer(turn["value"], add_special_tokens=False)["input_ids"])
        for i in range(len(datasets["val"]))
        for turn in datasets["val"].get_data_info(i)["conversations"]
    ]
    timings["tokenizer_s"] = time.perf_counter() - t
    print(
        f"  {len(tokenizer)} tokens ({tokenizer.vocab_size} BPE + grounding tokens); "
        f"val turns: mean {sum(lengths) / max(1, len(lengths)):.1f}, "
        f"max {max(lengths, default=0)} tokens"
    )

    t = _step(f"4/5 drawing one preview per task -> {work_dir / 'previews'}")
    previews = _write_previews(datasets["val"], work_dir / "previews")
    timings["previews_s"] = time.perf_counter() - t

    t = _step(f"5/5 stage 1: training the region proposer -> {work_dir / 'stage1'}")
    stage1, region_sets = _train_stage1(data_root, work_dir / "stage1", args.stage1_iters)
    timings["stage1_s"] = time.perf_counter() - t
    for key, value in sorted(stage1.items()):
        print(f"  {key:<34} {value:.4f}")
    print(f"  region sets drawn: {work_dir / 'stage1' / 'region_sets'}")

    summary = {
        "data_root": str(data_root),
        "generation": gen,
        "records": records,
        "tokenizer": {"path": str(work_dir / "tokenizer"), "size": len(tokenizer)},
        "previews": previews,
        "stage1": {"test": stage1, "region_sets": region_sets},
        "timings": timings,
    }
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\nsummary -> {work_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
