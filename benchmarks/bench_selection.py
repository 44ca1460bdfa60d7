"""Which region set should the chat model cite from? A finished quickstart's stage-3 model,
evaluated on a split's REC and RES records with the selector's score threshold and NMS IoU
changed at test time only (``RegionSelector(test_cfg=...)``; same weights in every row).
Prints a table and writes JSON.

    python benchmarks/bench_selection.py --work-dir work_dirs/quickstart \
        [--split val] [--score-thr 0.05 0.1] [--nms-thr 0.5 0.6 0.7]

Choose on ``val`` (the default) and report on ``test``: the rule is tuned on the split it is
chosen on. A looser rule keeps more regions, which raises ``rec/ceiling`` (the target among the
kept regions) and gives the pointer more distractors; the table shows which wins. The row
``trained`` is the rule the config evaluates with. Training with a looser rule is another
question (one run of it did no better; docs/NOTES.md, "A looser region set at test time").
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oracle_proposals import evaluate, print_rows, stage3_config, write_result  # noqa: E402

from groma_px.region_encoder import RegionSelector  # noqa: E402
from region_proposer.runtime import patch_checkpoint_loader  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_selection.json"


def rules(selector: dict, score_thrs: list[float], nms_thrs: list[float]) -> dict[str, dict]:
    """Row name -> test rule; first ``trained``, the rule the config evaluates with (its
    ``test_cfg`` over its training rule), then the grid without it."""
    own = RegionSelector(**{k: v for k, v in selector.items() if k != "type"}).test_cfg
    rows = {"trained": own}
    for score_thr, nms_thr in itertools.product(score_thrs, nms_thrs):
        rule = {"score_thr": score_thr, "nms_thr": nms_thr}
        if rule != own:
            rows[f"score>={score_thr:g} nms{nms_thr:g}"] = rule
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a finished quickstart")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--score-thr", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--nms-thr", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for name in ("score_thr", "nms_thr"):
        bad = [v for v in getattr(args, name) if not 0.0 <= v <= 1.0]
        if bad:
            raise SystemExit(f"--{name.replace('_', '-')} {bad}: thresholds lie in [0, 1]")

    patch_checkpoint_loader()
    cfg, checkpoint = stage3_config(args.work_dir)
    results = {}
    for name, rule in rules(cfg.model.selector, args.score_thr, args.nms_thr).items():
        print(f"== {name} ({args.split})", flush=True)
        out_dir = args.work_dir / "selection" / name.replace(" ", "_").replace(">=", "")
        selector = {"test_cfg": rule}  # the rule outside training (RegionSelector.test_cfg)
        metrics = evaluate(cfg, checkpoint, None, out_dir, selector=selector, split=args.split)
        results[name] = {"selector": rule, "metrics": metrics}

    print_rows(results, "selection")
    best = max(results, key=lambda n: results[n]["metrics"]["rec/acc@0.5"])
    print(f"best REC on {args.split}: {best}")
    result = {
        "what": f"{args.split}-split REC/RES of one stage-3 model under each selection rule",
        "work_dir": str(args.work_dir),
        "checkpoint": checkpoint,
        "split": args.split,
        "rows": results,
        "best_rec": best,
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
