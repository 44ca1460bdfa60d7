"""AdamW's step over the quickstart's trainable parameters: fused (one kernel for all of them,
the tiny configs' choice) against torch's per-tensor and multi-tensor (``foreach``) loops, as
ratios measured alternately in one run. Needs a finished quickstart (its stage-1 and stage-3
checkpoints and dumped configs). Prints a table, writes JSON.

    python benchmarks/bench_optimizer.py --work-dir work_dirs/quickstart

Each stage's model is built from its dumped config and final checkpoint; its trainable
parameters get fixed random gradients, and each variant's AdamW (the config's learning rate and
weight decay) takes ``--steps`` steps per block, the variants in turn, ``--rounds`` times. The
three variants compute the same update; after one step from the same state their parameters
agree to ``max_abs_difference``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oracle_proposals import write_result  # noqa: E402
from bench_train_steps import STAGES, _dumped, _runner, machine_result  # noqa: E402

from region_proposer.runtime import patch_checkpoint_loader  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_optimizer.json"
VARIANTS = {
    "per_tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def _optimizers(params: list, settings: dict) -> dict[str, torch.optim.AdamW]:
    return {name: torch.optim.AdamW(params, **settings, **kw) for name, kw in VARIANTS.items()}


def _max_difference(params: list, settings: dict) -> float:
    """Largest |difference| between the variants' parameters after one step from one state."""
    start = [p.detach().clone() for p in params]
    after = {}
    for name, optimizer in _optimizers(params, settings).items():
        optimizer.step()
        after[name] = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    return max(
        float((a - b).abs().max())
        for name in after
        for a, b in zip(after[name], after["fused"], strict=True)
    )


def stage_steps(work_dir: Path, stage: str, steps: int, rounds: int) -> dict:
    """Milliseconds per AdamW step of each variant over ``stage``'s trainable parameters."""
    cfg, checkpoint = _dumped(work_dir, stage)
    runner, _ = _runner(cfg, checkpoint)
    params = [p for p in runner.model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer_cfg = cfg.optim_wrapper.optimizer
    settings = {k: optimizer_cfg[k] for k in ("lr", "weight_decay") if k in optimizer_cfg}
    difference = _max_difference(params, settings)
    optimizers = _optimizers(params, settings)
    blocks: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(rounds):
        for name in optimizers if r % 2 == 0 else reversed(optimizers):
            optimizers[name].step()  # state allocated, caches warm
            start = time.perf_counter()
            for _ in range(steps):
                optimizers[name].step()
            blocks[name].append((time.perf_counter() - start) / steps * 1000)
            print(f"  {stage}, {name}: {blocks[name][-1]:.2f} ms/step", flush=True)
    return {
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "max_abs_difference": difference,
        **{f"{name}_ms": statistics.median(v) for name, v in blocks.items()},
        "blocks": blocks,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a finished quickstart")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per variant")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    patch_checkpoint_loader()
    stages = {s: stage_steps(args.work_dir, s, args.steps, args.rounds) for s in STAGES}
    print(
        f"\n{'stage':<8} {'params':>10} {'per-tensor ms':>14} {'foreach ms':>11} {'fused ms':>9}"
        f" {'fused/per-tensor':>17}"
    )
    for stage, r in stages.items():
        print(
            f"{stage:<8} {r['parameters']:>10} {r['per_tensor_ms']:>14.2f} {r['foreach_ms']:>11.2f}"
            f" {r['fused_ms']:>9.2f} {r['fused_ms'] / r['per_tensor_ms']:>17.3f}"
        )
    result = machine_result(
        "AdamW step over the quickstart's trainable parameters, variants alternately",
        args.work_dir,
        stages=stages,
        ratios={s: r["fused_ms"] / r["per_tensor_ms"] for s, r in stages.items()},
    )
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
