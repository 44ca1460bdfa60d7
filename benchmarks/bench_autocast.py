"""bf16 autocast (``region_proposer.AutocastOptimWrapper``) against fp32 training steps of the
quickstart's stages, as ratios measured alternately in one run. Needs a finished quickstart (its
data and stage-1 and stage-3 checkpoints). Prints a table, writes JSON.

    python benchmarks/bench_autocast.py --work-dir work_dirs/quickstart

Each stage's model takes training steps from its final checkpoint in alternating blocks of
``--steps``, once with the fp32 ``OptimWrapper`` and once with ``AutocastOptimWrapper`` (two
optimizers over the same weights; only the time is compared). Stage 3 first runs every training
image through the perception cache, as stage 3 of the quickstart finds it after stage 2. Also
reported: the relative difference of the loss of the same batches computed in bf16 and fp32
(forward only). The gain depends on the CPU: native bf16 (AVX-512 BF16, AMX) is what pays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oracle_proposals import write_result  # noqa: E402
from bench_train_steps import (  # noqa: E402
    STAGES,
    _alternate,
    _dumped,
    _runner,
    _warm_perception,
    machine_result,
)

from region_proposer.optim import cpu_has_fast_bf16  # noqa: E402
from region_proposer.runtime import patch_checkpoint_loader  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_autocast.json"


class _Both:
    """Alternates two optim wrappers over one model: ``_alternate`` keys its loaders by wrapper."""

    def __init__(self, model, wrappers: dict) -> None:
        self.model, self.wrappers, self.current = model, wrappers, None

    def train_step(self, data, _optim):
        return self.model.train_step(data, self.wrappers[self.current])


def _loss_difference(model, batches: list, bf16) -> float:
    """Median over ``batches`` of |loss_bf16 - loss_fp32| / |loss_fp32| (forward only; bf16:
    inside the ``bf16`` wrapper's ``optim_context``, as its training steps run)."""
    diffs = []
    with torch.no_grad():
        for data in batches:
            torch.manual_seed(0)
            full = model._run_forward(model.data_preprocessor(data, True), mode="loss")
            torch.manual_seed(0)
            with bf16.optim_context(model):
                low = model._run_forward(model.data_preprocessor(data, True), mode="loss")
            ref, cast = model.parse_losses(full)[0], model.parse_losses(low)[0]
            diffs.append(float((cast.float() - ref).abs() / ref.abs().clamp(min=1e-8)))
    return statistics.median(diffs)


def stage_steps(work_dir: Path, stage: str, steps: int, rounds: int) -> dict:
    """Seconds per training step of ``stage`` with fp32 and with bf16 autocast (median block)."""
    cfg, checkpoint = _dumped(work_dir, stage)
    runner, _ = _runner(cfg, checkpoint, cuda=False, cpu_bf16=False)
    # The config's optimizer, clipping and multipliers, whatever precision it asks for.
    base = {k: v for k, v in cfg.optim_wrapper.items() if k not in ("type", "dtype", "loss_scale")}
    fp32 = runner.build_optim_wrapper(dict(base, type="OptimWrapper"))
    bf16 = runner.build_optim_wrapper(dict(base, type="region_proposer.AutocastOptimWrapper"))
    model = runner.model.train()
    loader = runner.build_dataloader(cfg.train_dataloader)
    if stage != "stage1":
        _warm_perception(model, loader.dataset, cfg.train_dataloader.batch_size)
    batches = iter(loader)
    both = _Both(model, {"fp32": fp32, "bf16": bf16})
    blocks = _alternate(
        both,
        None,
        {"fp32": batches, "bf16": batches},
        steps,
        rounds,
        f"{stage}, {{}}",
        on_block=lambda key: setattr(both, "current", key),
    )
    difference = _loss_difference(model, [next(batches) for _ in range(3)], bf16)
    medians = {f"{k}_s": statistics.median(v) for k, v in blocks.items()}
    return medians | {"loss_rel_difference": difference, "blocks": blocks}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a finished quickstart")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per precision")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    patch_checkpoint_loader()
    torch.manual_seed(0)
    stages = {s: stage_steps(args.work_dir, s, args.steps, args.rounds) for s in STAGES}
    print(
        f"\n{'training step':<16} {'bf16 s':>8} {'fp32 s':>8} {'bf16/fp32':>10} {'loss diff':>10}"
    )
    for name, r in stages.items():
        ratio = r["bf16_s"] / r["fp32_s"]
        print(
            f"{name:<16} {r['bf16_s']:>8.3f} {r['fp32_s']:>8.3f} {ratio:>10.3f} "
            f"{r['loss_rel_difference']:>10.2e}"
        )
    result = machine_result(
        "bf16 autocast vs fp32 training steps of the quickstart, alternately in one run",
        args.work_dir,
        cpu_has_fast_bf16=cpu_has_fast_bf16(),
        stages=stages,
        ratios={name: r["bf16_s"] / r["fp32_s"] for name, r in stages.items()},
    )
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
