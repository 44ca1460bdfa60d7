"""How much of the REC/RES gap is the proposer's? A finished quickstart's stage-3 model, evaluated
on the test split's REC and RES records with its regions drawn from different sources. Prints a
table and writes JSON.

    python benchmarks/bench_oracle_proposals.py --work-dir work_dirs/quickstart

Rows (the same trained weights; only the proposals change, at test time):

- ``learned``: the stage-1 proposer (and its box refiner, when the model has one), as the
  quickstart evaluates it;
- ``oracle``: every ground-truth box of the image, exact (``GroundTruthProposer``);
- ``oracle+jitter``: the ground-truth boxes with Gaussian noise of ``--jitter`` times the box
  size on each coordinate (loose boxes, as a weaker detector's);
- ``oracle+distractors``: the exact boxes plus ``--distractors`` random boxes per image scored
  above the selection threshold (background regions).

The oracle rows take the boxes as they are (the model's box refiner is switched off for them).
They are upper bounds, not results: they say whether the region encoder, the LLM and
the pointer would meet a target given better boxes, and which property of the boxes matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

from region_proposer.runtime import patch_checkpoint_loader

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_oracle_proposals.json"
KEYS = (
    "rec/acc@0.5",
    "rec/ceiling",
    "rec/plain/acc@0.5",
    "rec/relational/acc@0.5",
    "res/cIoU",
    "res/gIoU",
)


def stage3_config(work_dir: Path) -> tuple[Config, str]:
    """The stage-3 config a quickstart dumped and its last checkpoint."""
    summary_file = work_dir / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file} not found: run tools/quickstart.py first")
    checkpoint = json.loads(summary_file.read_text())["chat"]["checkpoints"][-1]
    configs = sorted((work_dir / "stage3").glob("*.py"))
    if len(configs) != 1:
        raise FileNotFoundError(
            f"expected one dumped config in {work_dir / 'stage3'}, got {configs}"
        )
    return Config.fromfile(str(configs[0])), checkpoint


def sources(jitter: float, distractors: int, score_thr: float) -> dict[str, dict | None]:
    """Row name -> proposer config (None: the trained one)."""

    def oracle(**kwargs) -> dict:
        base = dict(type="GroundTruthProposer", jitter=0.0, drop_rate=0.0, num_distractors=0)
        return {**base, **kwargs}

    # Distractors must survive the selector's score threshold to be background regions.
    distractor_score = min(0.999, max(0.2, 2 * score_thr))
    return {
        "learned": None,
        "oracle": oracle(),
        "oracle+jitter": oracle(jitter=jitter),
        "oracle+distractors": oracle(
            num_distractors=distractors, distractor_score=distractor_score
        ),
    }


def evaluate(
    cfg: Config,
    checkpoint: str,
    proposer: dict | None,
    work_dir: Path,
    *,
    selector: dict | None = None,
    split: str = "test",
) -> dict:
    """REC and RES metrics of ``checkpoint`` on ``split`` with ``proposer`` (None: the trained
    one) and the selector's keys overridden by ``selector``."""
    cfg = cfg.copy()
    if proposer is not None:
        cfg.model.proposer = proposer
        cfg.model.box_refiner = None  # the oracle's boxes as they are
    cfg.model.selector.update(selector or {})
    cfg.test_dataloader.dataset.ann_file = f"{split}.jsonl"
    cfg.test_dataloader.dataset.tasks = ["rec", "res"]
    cfg.test_evaluator = [dict(type="RECMetric"), dict(type="RESMetric")]
    cfg.load_from = checkpoint
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"{work_dir.name}_{time.time_ns()}"
    cfg.train_dataloader = cfg.train_cfg = cfg.optim_wrapper = cfg.param_scheduler = None
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    runner = Runner.from_cfg(cfg)
    return {k: float(v) for k, v in runner.test().items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a finished quickstart")
    parser.add_argument("--jitter", type=float, default=0.1, help="box noise / box size")
    parser.add_argument("--distractors", type=int, default=10, help="random boxes per image")
    parser.add_argument("--rows", nargs="+", help="evaluate only these rows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    patch_checkpoint_loader()
    cfg, checkpoint = stage3_config(args.work_dir)
    rows = sources(args.jitter, args.distractors, float(cfg.model.selector.score_thr))
    unknown = sorted(set(args.rows or ()) - set(rows))
    if unknown:
        raise SystemExit(f"--rows {unknown}: known rows are {list(rows)}")
    results = {}
    for name, proposer in rows.items():
        if args.rows and name not in args.rows:
            continue
        print(f"== {name}", flush=True)
        metrics = evaluate(cfg, checkpoint, proposer, args.work_dir / "oracle_proposals" / name)
        results[name] = {"proposer": proposer or "trained", "metrics": metrics}

    print_rows(results, "proposals")
    result = {
        "what": "test-split REC/RES of one stage-3 model with its regions from each source",
        "work_dir": str(args.work_dir),
        "checkpoint": checkpoint,
        "jitter": args.jitter,
        "distractors": args.distractors,
        "rows": results,
    }
    return write_result(result, args.out)


def print_rows(rows: dict[str, dict], label: str) -> None:
    """The ``KEYS`` metrics of each row (``{"metrics": {...}}``) as a table."""
    print(f"\n{label:<22}" + "".join(f"{k:>24}" for k in KEYS))
    for name, row in rows.items():
        values = "".join(f"{row['metrics'].get(k, float('nan')):>24.4f}" for k in KEYS)
        print(f"{name:<22}{values}")


def write_result(result: dict, out: Path) -> dict:
    """Writes ``result`` as JSON to ``out`` and returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
