"""The main job on the embedded default: synthetic grounded scenes end to end.

    python tools/quickstart.py --work-dir work_dirs/quickstart

Generates the synthetic grounded-scenes dataset (unless WORK_DIR/data already holds the same
one), validates every record, trains the byte-level BPE tokenizer with the grounding tokens, draws
one preview per task, then trains the tiny pipeline with mmengine Runners: stage 1 (region
proposer, ``configs/proposer/ddetr_vit-tiny_synthetic.py``), stage 2 (alignment) and stage 3
(fine-tuning) (``configs/groma_px/*stage{2,3}*``); evaluates grounded chat on the test split,
exports the model to WORK_DIR/model (``GroundedChat.from_pretrained``), draws example answers and
writes ``WORK_DIR/metrics.json`` (flat keys such as ``rec/acc@0.5``) and ``WORK_DIR/summary.json``.

Ablations of the chat stages reuse a finished run's stage 1 (same data) and override the stage-2
and stage-3 configs (keys must exist), e.g. without the copy head:

    python tools/quickstart.py --work-dir work_dirs/no_copy --stage1-from work_dirs/quickstart \
        --cfg-options model.copy_head=None
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from groma_px.data import GroundedConversationDataset
from groma_px.data.synthetic import GENERATOR_VERSION, generate_dataset
from groma_px.engine.stages import (
    chat_config,
    draw_predictions,
    export_runner_model,
    print_table,
    prompt_caption_accuracy,
    release_loader_workers,
    train_stage,
)
from groma_px.inference import GroundedChat
from groma_px.llm.tokenizer import build_tokenizer_from_jsonl
from groma_px.llm.vocab import GroundingVocab
from groma_px.visualization import draw_record
from region_proposer.runtime import apply_cfg_options, configure_for_device, patch_checkpoint_loader
from region_proposer.visualization import draw_proposals

SPLITS = ("train", "val", "test")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE1_CONFIG = CONFIGS / "proposer/ddetr_vit-tiny_synthetic.py"
STAGE2_CONFIG = CONFIGS / "groma_px/groma-px_ddetr-vit-tiny_llama-tiny_stage2_synthetic.py"
STAGE3_CONFIG = CONFIGS / "groma_px/groma-px_ddetr-vit-tiny_llama-tiny_stage3_synthetic.py"
STEPS = 8


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


def _existing_data(data_root: Path, args: argparse.Namespace) -> dict | None:
    """The generation summary of ``data_root`` if it already holds this exact dataset."""
    meta_file = data_root / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    wanted = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    splits = meta.get("splits", {})
    same = (
        meta.get("seed") == args.seed
        and meta.get("version") == GENERATOR_VERSION  # a newer generator adds tasks
        and all(splits.get(k, {}).get("images") == n for k, n in wanted.items())
    )
    return meta if same and all((data_root / f"{k}.jsonl").is_file() for k in wanted) else None


def _loader_options(cfg: Config, workers: int | None) -> dict[str, int | bool]:
    """Config options setting the data-loader workers of every split ``cfg`` loads (none for
    ``workers=None``: the config's own)."""
    options: dict[str, int | bool] = {}
    if workers is None:
        return options
    for split in SPLITS:
        if cfg.get(f"{split}_dataloader") is None:  # no validation in the chat stages
            continue
        options[f"{split}_dataloader.num_workers"] = workers
        options[f"{split}_dataloader.persistent_workers"] = workers > 0
    return options


def _train_stage1(
    data_root: Path, work_dir: Path, iters: int | None, workers: int | None = None
) -> tuple[dict, list[str]]:
    """Trains and tests the stage-1 proposer; returns test metrics and region-set pictures."""
    patch_checkpoint_loader()
    cfg = Config.fromfile(str(STAGE1_CONFIG))
    options = {f"{split}_dataloader.dataset.data_root": str(data_root) for split in SPLITS}
    options.update(_loader_options(cfg, workers))
    if iters is not None:
        options.update(
            {
                "train_cfg.max_iters": iters,
                # The config's warm-up share (200 of 1,800 iterations) and decay at 80 %.
                "param_scheduler.0.end": max(1, iters // 9),
                "param_scheduler.1.milestones": [int(iters * 0.8)],
            }
        )
    apply_cfg_options(cfg, options)
    # The quickstart reports the test split: no validation pass at the end of training (20 s)
    # and so no best-checkpoint bookkeeping.
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    for key in ("save_best", "rule"):
        cfg.default_hooks.checkpoint.pop(key, None)
    cfg.work_dir = str(work_dir)
    configure_for_device(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    selection = cfg.get("region_selection", {})
    pictures = draw_proposals(
        runner.model, runner.test_dataloader, work_dir / "region_sets", num_images=4, **selection
    )
    release_loader_workers(runner)
    return {k: float(v) for k, v in metrics.items()}, [str(p) for p in pictures]


def _reused_stage1(source: Path, data_root: Path, iters: int) -> tuple[dict, list[str], Path]:
    """``--stage1-from``: the stage-1 test metrics, pictures and checkpoint of an earlier run.

    Raises:
        FileNotFoundError: If ``source`` lacks its summary, data or the stage-1 checkpoint.
        ValueError: If that run trained on other data (generator version, seed or split sizes).
    """
    files = [source / "summary.json", source / "data" / "meta.json"]
    checkpoint = source / "stage1" / f"iter_{iters}.pth"
    for path in [*files, checkpoint]:
        if not path.is_file():
            raise FileNotFoundError(
                f"--stage1-from {source}: no {path.relative_to(source)} (a finished quickstart "
                f"with --stage1-iters {iters} writes it)"
            )

    def data(meta_file: Path) -> tuple:
        meta = json.loads(meta_file.read_text())
        splits = {k: v.get("images") for k, v in meta.get("splits", {}).items()}
        return meta.get("version"), meta.get("seed"), splits

    if data(files[1]) != data(data_root / "meta.json"):
        raise ValueError(
            f"--stage1-from {source}: its stage 1 trained on other data (generator version, "
            f"seed, images per split: {data(files[1])}) than this run's "
            f"{data(data_root / 'meta.json')}"
        )
    summary = json.loads(files[0].read_text())
    return summary["stage1"]["test"], summary["stage1"]["region_sets"], checkpoint


def _train_chat(
    args: argparse.Namespace,
    data_root: Path,
    work_dir: Path,
    stage1_checkpoint: Path,
    timings: dict[str, float],
) -> dict:
    """Stages 2 and 3, the test-split evaluation, the export and the example pictures."""
    paths = dict(
        data_root=data_root,
        tokenizer_dir=work_dir / "tokenizer",
        num_region_tokens=args.num_region_tokens,
    )
    t = _step(f"6/{STEPS} stage 2: alignment (perception and LLM frozen) -> {work_dir / 'stage2'}")
    cfg2 = chat_config(
        STAGE2_CONFIG,
        **paths,
        work_dir=work_dir / "stage2",
        load_from=stage1_checkpoint,
        iters=args.stage2_iters,
        validate=False,
    )
    apply_cfg_options(cfg2, _loader_options(cfg2, args.loader_workers))
    apply_cfg_options(cfg2, args.cfg_options)
    _, _, ckpt2 = train_stage(cfg2)
    timings["stage2_s"] = time.perf_counter() - t

    t = _step(f"7/{STEPS} stage 3: fine-tuning (LLM trains) -> {work_dir / 'stage3'}")
    cfg3 = chat_config(
        STAGE3_CONFIG,
        **paths,
        work_dir=work_dir / "stage3",
        load_from=ckpt2,
        iters=args.stage3_iters,
        validate=False,
    )
    apply_cfg_options(cfg3, _loader_options(cfg3, args.loader_workers))
    apply_cfg_options(cfg3, args.cfg_options)
    runner, _, ckpt3 = train_stage(cfg3)
    timings["stage3_s"] = time.perf_counter() - t

    t = _step(f"8/{STEPS} evaluating grounded chat on the test split, exporting, drawing")
    test = {k: float(v) for k, v in runner.test().items()}
    model_dir = export_runner_model(runner, cfg3, work_dir / "model")
    examples = draw_predictions(runner, work_dir / "examples")
    # Box, point and mask prompts on the exported model: does the caption name the object?
    test.update(prompt_caption_accuracy(GroundedChat.from_pretrained(model_dir), data_root))
    release_loader_workers(runner)
    timings["evaluate_s"] = time.perf_counter() - t
    print(f"  model -> {model_dir}; {len(examples)} example answers -> {work_dir / 'examples'}")
    return {"test": test, "checkpoints": [ckpt2, ckpt3], "examples": examples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes generating the synthetic data",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        help="data-loader workers of every stage (default: the configs', 0: the main process "
        "loads from decoded images it keeps)",
    )
    parser.add_argument("--num-region-tokens", type=int, default=100)
    parser.add_argument("--stage1-iters", type=int, default=720, help="stage-1 iterations")
    parser.add_argument("--stage2-iters", type=int, default=80, help="stage-2 iterations")
    parser.add_argument("--stage3-iters", type=int, default=580, help="stage-3 iterations")
    parser.add_argument(
        "--stage1-from",
        type=Path,
        metavar="DIR",
        help="reuse the stage 1 of an earlier quickstart in DIR (same data) instead of training it",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        metavar="KEY=VALUE",
        help="overrides of the stage-2 and stage-3 configs (keys must exist)",
    )
    args = parser.parse_args(argv)
    if args.loader_workers is not None and args.loader_workers < 0:
        parser.error(f"--loader-workers {args.loader_workers}: must be 0 or more")
    for config in (STAGE2_CONFIG, STAGE3_CONFIG):  # a misspelt key fails now, not after stage 1
        apply_cfg_options(Config.fromfile(str(config)), args.cfg_options)
    work_dir, timings = Path(args.work_dir), {}
    data_root = work_dir / "data"

    t = _step(f"1/{STEPS} synthetic grounded scenes -> {data_root}")
    gen = _existing_data(data_root, args)
    if gen is not None:
        print("  already there (same seed and sizes): not regenerated")
    else:
        gen = generate_dataset(
            data_root, args.num_train, args.num_val, args.num_test, args.seed, workers=args.workers
        )
        print(
            f"  {sum(s['images'] for s in gen['splits'].values())} images in "
            f"{gen['seconds']:.1f} s ({gen['images_per_second']:.0f} images/s, "
            f"{args.workers} workers)"
        )
    timings["generate_s"] = time.perf_counter() - t

    t = _step(f"2/{STEPS} validating every record (GroundedConversationDataset)")
    datasets = _load_splits(data_root)
    records = _print_table(datasets)
    timings["validate_s"] = time.perf_counter() - t

    t = _step(f"3/{STEPS} training the tokenizer -> {work_dir / 'tokenizer'}")
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

    t = _step(f"4/{STEPS} drawing one preview per task -> {work_dir / 'previews'}")
    previews = _write_previews(datasets["val"], work_dir / "previews")
    timings["previews_s"] = time.perf_counter() - t

    if args.stage1_from is not None:
        t = _step(f"5/{STEPS} stage 1: reusing {args.stage1_from / 'stage1'}")
        stage1, region_sets, checkpoint1 = _reused_stage1(
            args.stage1_from, data_root, args.stage1_iters
        )
    else:
        t = _step(f"5/{STEPS} stage 1: training the region proposer -> {work_dir / 'stage1'}")
        stage1, region_sets = _train_stage1(
            data_root, work_dir / "stage1", args.stage1_iters, args.loader_workers
        )
        checkpoint1 = work_dir / "stage1" / f"iter_{args.stage1_iters}.pth"
    timings["stage1_s"] = time.perf_counter() - t
    for key, value in sorted(stage1.items()):
        print(f"  {key:<34} {value:.4f}")
    print(f"  region sets drawn: {Path(region_sets[0]).parent if region_sets else '-'}")

    chat = _train_chat(args, data_root, work_dir, checkpoint1, timings)
    metrics = {**{k: v for k, v in stage1.items() if k.startswith("proposer/")}, **chat["test"]}
    (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print_table(metrics, f"test split metrics -> {work_dir / 'metrics.json'}")

    summary = {
        "data_root": str(data_root),
        "generation": gen,
        "records": records,
        "tokenizer": {"path": str(work_dir / "tokenizer"), "size": len(tokenizer)},
        "previews": previews,
        "stage1": {
            "test": stage1,
            "region_sets": region_sets,
            "checkpoint": str(checkpoint1),
            "reused_from": None if args.stage1_from is None else str(args.stage1_from),
        },
        "cfg_options": args.cfg_options or {},
        "chat": chat,
        "metrics": metrics,
        "timings": timings,
    }
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\nsummary -> {work_dir / 'summary.json'}; model -> {work_dir / 'model'}")
    print(f"total {sum(timings.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
