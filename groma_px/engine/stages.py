"""Running the tiny pipeline's stages with mmengine Runners (used by ``tools/quickstart.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image

from region_proposer.runtime import apply_cfg_options, configure_for_device, patch_checkpoint_loader

from ..inference.export import export_pretrained
from ..visualization import add_caption, draw_response

SPLITS = ("train", "val", "test")


def chat_config(
    config: str | Path,
    *,
    data_root: str | Path,
    tokenizer_dir: str | Path,
    work_dir: str | Path,
    load_from: str | Path | None,
    iters: int | None = None,
    validate: bool = True,
    num_region_tokens: int | None = None,
) -> Config:
    """A stage-2/3 config pointed at one data root and tokenizer, with an optional iteration
    budget (the schedule is rescaled: warm-up 10 %, cosine to the end); ``validate=False``
    drops the validation loop (the quickstart evaluates on the test split instead);
    ``num_region_tokens`` caps the selector's top-K at the tokenizer's region tokens."""
    cfg = Config.fromfile(str(config))
    options: dict[str, Any] = {"model.tokenizer": str(tokenizer_dir)}
    for split in SPLITS:
        options[f"{split}_dataloader.dataset.data_root"] = str(data_root)
        for i, step in enumerate(cfg[f"{split}_dataloader"]["dataset"]["pipeline"]):
            if step["type"] == "PackGroundedChatInputs":
                options[f"{split}_dataloader.dataset.pipeline.{i}.tokenizer"] = str(tokenizer_dir)
    for i, step in enumerate(cfg.get("test_pipeline", [])):
        if step["type"] == "PackGroundedChatInputs":
            options[f"test_pipeline.{i}.tokenizer"] = str(tokenizer_dir)
    if num_region_tokens is not None:
        options["model.selector.top_k"] = min(cfg.model.selector.top_k, num_region_tokens)
    if iters is not None:
        warmup = max(1, iters // 10)
        options.update(
            {
                "train_cfg.max_iters": iters,
                "train_cfg.val_interval": iters + 1,
                "param_scheduler.0.end": warmup,
                "param_scheduler.1.begin": warmup,
                "param_scheduler.1.end": iters,
                "default_hooks.checkpoint.interval": iters,
            }
        )
    apply_cfg_options(cfg, options)
    if not validate:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.load_from = None if load_from is None else str(load_from)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"{Path(work_dir).name}_{time.time_ns()}"
    return cfg


def release_loader_workers(
    runner: Runner, loops: tuple[str, ...] = ("train", "val", "test")
) -> int:
    """Stops the data-loader worker processes of the runner's ``loops`` now; returns how many
    loader iterators it shut down.

    A persistent loader's workers (and the iterator of an iteration-based train loop) otherwise
    live until the garbage collector breaks the runner's reference cycles. Finalised in that
    order, the workers no longer hear the shutdown request, and torch waits for each of them for
    ``MP_STATUS_CHECK_INTERVAL`` (5 s) before terminating it: in the quickstart, 30 s between
    stages 1 and 2 (six workers), spent inside the next runner's constructor (docs/NOTES.md).
    Call it when a loop is done with (a loop iterated again starts new workers; the train loop
    must not train again).
    """
    iterators: dict[int, Any] = {}
    for name in loops:
        loop = getattr(runner, f"_{name}_loop", None)
        if loop is None or isinstance(loop, dict):  # never built
            continue
        loader = getattr(loop, "dataloader", None)
        for holder in (getattr(loop, "dataloader_iterator", None), loader):
            iterator = getattr(holder, "_iterator", None)
            if hasattr(iterator, "_shutdown_workers") and not iterator._shutdown:
                iterators[id(iterator)] = iterator
        if getattr(loader, "_iterator", None) is not None:  # persistent workers
            loader._iterator = None  # the next epoch starts new ones
    for iterator in iterators.values():
        iterator._shutdown_workers()
    return len(iterators)


def train_stage(cfg: Config, *, test: bool = False) -> tuple[Runner, dict[str, float], str]:
    """Trains ``cfg``; returns the runner, test metrics (if ``test``) and the last checkpoint.
    The train loop's loader workers are stopped after training (``release_loader_workers``)."""
    patch_checkpoint_loader()
    configure_for_device(cfg)  # bf16 autocast where the CPU has it (optim_wrapper_for_device)
    runner = Runner.from_cfg(cfg)
    runner.train()
    release_loader_workers(runner, ("train",))
    metrics = {k: float(v) for k, v in runner.test().items()} if test else {}
    checkpoint = Path(cfg.work_dir) / f"iter_{cfg.train_cfg.max_iters}.pth"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"stage finished without writing {checkpoint}")
    return runner, metrics, str(checkpoint)


def export_runner_model(runner: Runner, cfg: Config, directory: str | Path) -> Path:
    """Exports the runner's (unwrapped) model with the config's test pipeline."""
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    cfg = cfg.copy()
    cfg.test_pipeline = cfg.test_dataloader.dataset.pipeline
    return export_pretrained(model, cfg, directory)


@torch.no_grad()
def draw_predictions(runner: Runner, out_dir: str | Path, *, per_task: int = 2) -> list[str]:
    """Draws ``per_task`` test answers per task: cited regions labelled by phrase, the question
    and the answer underneath."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    model.eval()
    loader = runner.test_dataloader
    dataset = loader.dataset
    picked: dict[str, list[int]] = {}  # the first per_task records of each task, file order
    for i in range(len(dataset)):
        chosen = picked.setdefault(dataset.get_data_info(i)["task"], [])
        if len(chosen) < per_task:
            chosen.append(i)
    indices = [i for chosen in picked.values() for i in chosen]
    counts: dict[str, int] = {}
    written: list[str] = []
    size = loader.batch_size or 1
    for start in range(0, len(indices), size):
        batch = loader.collate_fn([dataset[i] for i in indices[start : start + size]])
        for sample in model.test_step(batch):
            task = sample.metainfo["task"]
            counts[task] = counts.get(task, 0) + 1
            written.append(_draw_one(sample, out_dir / f"{task}_{counts[task]}.png"))
    return written


def _draw_one(sample: Any, path: Path) -> str:
    response = sample.pred_response
    image = draw_response(Image.open(sample.metainfo["img_path"]).convert("RGB"), response)
    question = (sample.metainfo.get("question") or "").replace("<image>", "").strip()
    lines = [f"Q: {question}"] if question else []
    lines += [f"A: {response.raw_text}", f"reference: {sample.metainfo.get('answer', '')}"]
    add_caption(image, lines).save(path)
    return str(path)


def print_table(metrics: Mapping[str, float], title: str) -> None:
    """A two-column table of metrics, sorted by key."""
    print(f"\n{title}")
    width = max([len(k) for k in metrics] + [10])
    print(f"  {'metric':<{width}}  value")
    for key in sorted(metrics):
        print(f"  {key:<{width}}  {metrics[key]:.4f}")


def prompt_caption_accuracy(
    chat: Any, data_root: str | Path, *, split: str = "test", limit: int = 60
) -> dict[str, float]:
    """Region captions asked with each kind of visual prompt, scored by whether the answer
    names the object's colour and shape (``prompt/{box,point,mask}_acc``).

    The first ``limit`` ``region_caption`` records of ``{split}.jsonl`` are asked "What object
    is shown in <roi><refer_box></roi>?" with the cited region given as its box, as a point
    (``mask_point`` of its mask) and as its mask. Records whose region has no mask, colour or
    category are skipped.
    """
    from pycocotools import mask as mask_utils

    from ..region_encoder.prompts import mask_point

    hits = {"box": 0, "point": 0, "mask": 0}
    count = 0
    root = Path(data_root)
    with open(root / f"{split}.jsonl", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if record["task"] != "region_caption" or count >= limit:
                continue
            region = record["regions"][record["conversations"][0]["regions"][0]]
            color = region.get("attributes", {}).get("color")
            if region.get("mask") is None or not color or not region.get("category"):
                continue
            mask = torch.from_numpy(mask_utils.decode(region["mask"]).astype(bool))
            prompts = {
                "box": {"box": region["box"]},
                "point": {"point": mask_point(mask)},
                "mask": {"mask": region["mask"]},
            }
            count += 1
            for kind, prompt in prompts.items():
                answer = chat.chat(
                    root / record["image"],
                    "What object is shown in <roi><refer_box></roi>?",
                    regions=[prompt],
                ).text
                hits[kind] += int(color in answer and region["category"] in answer)
    out = {f"prompt/{kind}_acc": hit / max(count, 1) for kind, hit in hits.items()}
    return {**out, "prompt/count": float(count)}
