"""Where the quickstart's training steps spend time, as ratios measured alternately in one run.
Needs a finished quickstart (its data, stage-1 and stage-3 checkpoints). Prints a table, writes
JSON.

    python benchmarks/bench_train_steps.py --work-dir work_dirs/quickstart

Rows:

- ``stage1 / stage3 loader workers``: training steps (the dumped config, from its final
  checkpoint; stage 3 with the perception cache warmed with every training image) loading in
  the main process (0 workers) and with 2 data-loader workers, in alternating blocks of
  ``--steps``; on 2 CPU cores the workers compete with the step's two compute threads.
- ``mask pixels``: forward and backward of the mask head's pixel embeddings (stem on the image +
  pyramid levels) for the images whose answers cite a region, against every image of the batch,
  on stage-3 training batches (the final stage-3 model). Pixels of an image do not
  depend on its batch-mates, so the masks are the same either way; ``mask loss`` is the whole
  mask branch (embeddings of the cited images, per-region logits, losses) for scale.

- ``stage3 sampler``: stage-3 training steps (the final stage-3 model, perception cache warmed
  with every training image first) with batches drawn by ``LengthGroupedSampler`` (opt-in:
  shuffled, then each group of 8 batches sorted by record length) against ``InfiniteSampler``
  (shuffled; the default), in alternating blocks of ``--steps``; also the share of the LLM's
  positions that are not padding under each.

- ``stage3 length groups``: stage-3 training steps (the final stage-3 model, perception cache
  warmed) with the LLM run on the whole right-padded batch (``length_groups=1``) against the
  config's ``llm.length_groups`` (rows grouped by length, each group cut to its longest), in
  alternating blocks of ``--steps`` on the same batches; also the share of the LLM's positions
  that are real under each, and the largest difference of the losses on one batch (same seeds).

``--sections`` runs some of these only (all by default).

Machines like this one are noisy: compare the two columns of a row, not runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oracle_proposals import write_result  # noqa: E402

from groma_px.llm.adapter import length_groups_of, right_padded_lengths  # noqa: E402
from groma_px.mask_head import mask_losses  # noqa: E402
from groma_px.models.masks import cited_regions, padded_targets  # noqa: E402
from region_proposer.runtime import (  # noqa: E402
    build_runner,
    optim_wrapper_for_device,
    patch_checkpoint_loader,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_train_steps.json"
STAGES = ("stage1", "stage3")


def _dumped(work_dir: Path, stage: str) -> tuple[Config, Path]:
    """A stage's dumped config and its last checkpoint."""
    configs = sorted((work_dir / stage).glob("*.py"))
    checkpoints = sorted(
        (work_dir / stage).glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1])
    )
    if len(configs) != 1 or not checkpoints:
        raise FileNotFoundError(
            f"{work_dir / stage}: expected one dumped config and an iter_*.pth checkpoint "
            "(run tools/quickstart.py first)"
        )
    cfg = Config.fromfile(str(configs[0]))
    cfg.work_dir = str(work_dir / "bench_train_steps" / stage)
    cfg.visualizer = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")])
    return cfg, checkpoints[-1]


def _runner(cfg: Config, checkpoint: Path, **device):
    """The runner with ``checkpoint`` loaded, and the config's optim wrapper for this device
    (``optim_wrapper_for_device``; ``device``: its ``cuda``/``cpu_bf16`` overrides)."""
    runner = build_runner(cfg)
    runner.load_checkpoint(str(checkpoint))
    return runner, runner.build_optim_wrapper(optim_wrapper_for_device(cfg.optim_wrapper, **device))


def machine_result(what: str, work_dir: Path, **fields: Any) -> dict:
    """A benchmark's JSON: ``what``, the quickstart run it measured, this machine's threads and
    cores, then ``fields`` (written with ``bench_oracle_proposals.write_result``)."""
    return {
        "what": what,
        "work_dir": str(work_dir),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        **fields,
    }


def loader_workers(work_dir: Path, stage: str, steps: int, rounds: int) -> dict:
    """Seconds per training step of ``stage`` loading in the main process (0 workers) and
    with 2 loader workers (median block)."""
    cfg, checkpoint = _dumped(work_dir, stage)
    runner, optim = _runner(cfg, checkpoint)
    model = runner.model.train()
    iterators = {}
    for workers in (0, 2):
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg.num_workers = workers
        loader_cfg.persistent_workers = workers > 0
        iterators[workers] = iter(runner.build_dataloader(loader_cfg))
    if stage != "stage1":
        _warm_perception(
            model,
            runner.build_dataloader(cfg.train_dataloader).dataset,
            cfg.train_dataloader.batch_size,
        )
    blocks = _alternate(model, optim, iterators, steps, rounds, f"{stage}, {{}} worker(s)")
    medians = {f"workers_{w}_s": statistics.median(v) for w, v in blocks.items()}
    return medians | {"blocks": {str(w): v for w, v in blocks.items()}}


def _alternate(
    model, optim, iterators: dict, steps: int, rounds: int, label: str, on_block=None
) -> dict:
    """Seconds per training step of each loader in ``iterators``, in blocks of ``steps``,
    alternating the order every round; one untimed step first (the other loader's workers
    woke up)."""
    blocks: dict[Any, list[float]] = {key: [] for key in iterators}
    for r in range(rounds):
        for key in iterators if r % 2 == 0 else reversed(iterators):
            if on_block is not None:
                on_block(key)
            batches = iterators[key]
            model.train_step(next(batches), optim)
            start = time.perf_counter()
            for _ in range(steps):
                model.train_step(next(batches), optim)
            blocks[key].append((time.perf_counter() - start) / steps)
            print(f"  {label.format(key)}: {blocks[key][-1]:.3f} s/step", flush=True)
    return blocks


def stage3_sampler(work_dir: Path, steps: int, rounds: int) -> dict:
    """Seconds per stage-3 training step and real share of LLM positions, per sampler."""
    cfg, checkpoint = _dumped(work_dir, "stage3")
    runner, optim = _runner(cfg, checkpoint)
    model = runner.model.train()
    size = cfg.train_dataloader.batch_size
    samplers = {
        "length_grouped": dict(type="LengthGroupedSampler", batch_size=size, megabatch=8, seed=0),
        "shuffled": dict(type="InfiniteSampler", shuffle=True, seed=0),
    }
    iterators = {}
    for name, sampler in samplers.items():
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg.sampler = sampler
        iterators[name] = iter(runner.build_dataloader(loader_cfg))
    _warm_perception(model, runner.build_dataloader(cfg.train_dataloader).dataset, size)
    positions = {name: [0, 0] for name in samplers}  # real, padded
    current = {"name": None}  # the sampler whose block runs

    def count(module, args, kwargs):
        mask = kwargs["attention_mask"]
        positions[current["name"]][0] += int(mask.sum())
        positions[current["name"]][1] += mask.numel()

    hook = model.llm.register_forward_pre_hook(count, with_kwargs=True)
    blocks = _alternate(
        model,
        optim,
        iterators,
        steps,
        rounds,
        "stage 3, {}",
        on_block=lambda name: current.update(name=name),
    )
    hook.remove()
    result = {f"{name}_s": statistics.median(v) for name, v in blocks.items()}
    result |= {f"{name}_real_positions": r / p for name, (r, p) in positions.items()}
    return result | {"blocks": blocks}


def stage3_length_groups(work_dir: Path, steps: int, rounds: int) -> dict:
    """Seconds per stage-3 training step with the padded LLM batch and with length groups."""
    cfg, checkpoint = _dumped(work_dir, "stage3")
    runner, optim = _runner(cfg, checkpoint)
    model = runner.model.train()
    grouped = int(cfg.model.llm.get("length_groups", 1))
    if grouped <= 1:
        raise ValueError(f"{work_dir}: its stage-3 config has no llm.length_groups > 1")
    loader = runner.build_dataloader(cfg.train_dataloader)
    batches = iter(loader)
    # Both settings step through the same batches, block by block.
    shared = [next(batches) for _ in range(rounds * (steps + 1))]
    _warm_perception(model, loader.dataset, cfg.train_dataloader.batch_size)
    positions = {1: [0, 0], grouped: [0, 0]}  # computed, of which real

    def count(module, args, kwargs):
        order = sorted(right_padded_lengths(kwargs["attention_mask"]), reverse=True)
        groups = length_groups_of(order, model.llm.length_groups)
        positions[model.llm.length_groups][0] += sum((e - s) * order[s] for s, e in groups)
        positions[model.llm.length_groups][1] += sum(order)

    def losses(groups: int, data: Any) -> dict[str, float]:
        model.llm.length_groups = groups
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(0)
        with torch.no_grad():
            batch = model.data_preprocessor(data, True)
            return {k: float(v) for k, v in model(**batch, mode="loss").items()}

    padded, cut = losses(1, shared[0]), losses(grouped, shared[0])
    difference = max(abs(padded[k] - cut[k]) for k in padded)
    hook = model.llm.register_forward_pre_hook(count, with_kwargs=True)
    times = _alternate(
        model,
        optim,
        {1: iter(shared), grouped: iter(shared)},
        steps,
        rounds,
        "stage 3, length_groups={}",
        on_block=lambda groups: setattr(model.llm, "length_groups", groups),
    )
    hook.remove()
    model.llm.length_groups = grouped
    return {
        "length_groups": grouped,
        "padded_s": statistics.median(times[1]),
        "grouped_s": statistics.median(times[grouped]),
        "padded_real_positions": positions[1][1] / positions[1][0],
        "grouped_real_positions": positions[grouped][1] / positions[grouped][0],
        "max_loss_difference": difference,
        "blocks": {str(k): v for k, v in times.items()},
    }


def _warm_perception(model, dataset, batch_size: int) -> None:
    """Runs every training image through the model's perception cache once."""
    first = {}
    for i in range(len(dataset)):
        first.setdefault(dataset.get_data_info(i)["img_path"], i)
    indices = list(first.values())
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            data = model.data_preprocessor(pseudo_collate(items), True)
            model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])


def mask_pixels(work_dir: Path, batches: int, repeats: int) -> dict:
    """Seconds of the mask pixel embeddings (cited images vs all) and the whole mask branch."""
    cfg, checkpoint = _dumped(work_dir, "stage3")
    runner, _ = _runner(cfg, checkpoint)
    model = runner.model.train()
    loader = iter(runner.build_dataloader(cfg.train_dataloader))
    times: dict[str, list[float]] = {"cited": [], "all": [], "mask_loss": []}
    images = []
    for _ in range(batches):
        data = model.data_preprocessor(next(loader), True)
        inputs, samples, sizes = data["inputs"], data["data_samples"], data["valid_sizes"]
        with torch.no_grad():
            perception = model.perceive(inputs, samples, sizes)
            batch = model._embed(perception, samples, padding_side="right")
            out = model.llm(batch["inputs_embeds"], attention_mask=batch["attention_mask"])
        cited = cited_regions(samples, perception, batch["labels"], model._region_cols)
        cited = cited.subset(model.max_masks)
        hidden = out.hidden_states[cited.batch_index, cited.positions - 1].detach()
        pyramid = perception.pyramids[model.consumers["mask"]]
        chosen = cited.batch_index.unique()
        images.append((len(chosen), len(inputs)))
        if len(chosen) == 0:  # no answer cites a region with a mask: nothing to time
            continue
        for _ in range(repeats):
            for name, index in (("cited", chosen), ("all", torch.arange(len(inputs)))):
                start = time.perf_counter()
                pixels = model.mask_head.pixel_embeddings(pyramid.select(index), inputs[index])
                pixels.sum().backward()
                times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            logits = model._mask_logits(perception, batch, inputs, cited, hidden)
            targets, extents = padded_targets(samples, cited, sizes, tuple(inputs.shape[-2:]))
            losses = mask_losses(logits, targets, extents, **model.mask_loss)
            sum(losses.values()).backward()
            times["mask_loss"].append(time.perf_counter() - start)
        model.zero_grad()
    if not times["mask_loss"]:
        raise RuntimeError(f"no batch of {work_dir} cites a region with a mask")
    result = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    result["cited_images_per_batch"] = statistics.mean(n for n, _ in images)
    result["batch_size"] = images[0][1]
    return result


SECTIONS = ("loader_workers", "mask_pixels", "stage3_sampler", "length_groups")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a finished quickstart")
    parser.add_argument("--steps", type=int, default=15, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per worker count")
    parser.add_argument("--batches", type=int, default=6, help="stage-3 batches")
    parser.add_argument("--repeats", type=int, default=3, help="timings per batch")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    patch_checkpoint_loader()
    torch.manual_seed(0)
    sections, rows = {}, []
    if "loader_workers" in args.sections:
        workers = {s: loader_workers(args.work_dir, s, args.steps, args.rounds) for s in STAGES}
        sections["loader_workers"] = workers
        rows += [
            (f"{s} step, loader workers 0 vs 2", w["workers_0_s"], w["workers_2_s"])
            for s, w in workers.items()
        ]
    if "mask_pixels" in args.sections:
        pixels = sections["mask_pixels"] = mask_pixels(args.work_dir, args.batches, args.repeats)
        rows.append(
            ("mask pixels fwd+bwd, cited vs all images", pixels["cited_s"], pixels["all_s"])
        )
    if "stage3_sampler" in args.sections:
        sampler = sections["stage3_sampler"] = stage3_sampler(
            args.work_dir, args.steps, args.rounds
        )
        rows.append(
            (
                "stage3 step, length-grouped vs shuffled",
                sampler["length_grouped_s"],
                sampler["shuffled_s"],
            )
        )
    if "length_groups" in args.sections:
        groups = sections["stage3_length_groups"] = stage3_length_groups(
            args.work_dir, args.steps, args.rounds
        )
        rows.append(
            (
                f"stage3 step, LLM length groups {groups['length_groups']} vs padded",
                groups["grouped_s"],
                groups["padded_s"],
            )
        )
    print(f"\n{'what':<44} {'new s':>8} {'old s':>8} {'new/old':>8}")
    for name, new, old in rows:
        print(f"{name:<44} {new:>8.3f} {old:>8.3f} {new / old:>8.3f}")
    if "mask_pixels" in sections:
        print(
            f"mask branch (fwd+bwd, cited images only): {pixels['mask_loss_s']:.3f} s/step; "
            f"{pixels['cited_images_per_batch']:.1f} of {pixels['batch_size']} images cite a "
            "region"
        )
    if "stage3_sampler" in sections:
        print(
            "real (not padding) share of the LLM's positions in stage 3: length-grouped "
            f"{sampler['length_grouped_real_positions']:.3f}, shuffled "
            f"{sampler['shuffled_real_positions']:.3f}"
        )
    if "stage3_length_groups" in sections:
        print(
            "real share of the positions the LLM computes in stage 3: padded "
            f"{groups['padded_real_positions']:.3f}, length groups "
            f"{groups['grouped_real_positions']:.3f}; largest loss difference "
            f"{groups['max_loss_difference']:.2e}"
        )
    result = machine_result(
        "training-step costs of the quickstart, alternately measured in one run",
        args.work_dir,
        **sections,
        ratios={name: new / old for name, new, old in rows},
    )
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
