"""The results table of a sweep: every ``trial_*/result.json`` -> ``results.csv`` (all metrics)
and ``results.md`` (the sweep metric and the reported ones), best first."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .spec import SweepSpec


def fmt(value: Any) -> str:
    """A parameter or metric value for the table (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_value(spec: SweepSpec, result: Mapping[str, Any]) -> float | None:
    """The sweep metric of a trial result; None if it failed or did not report it."""
    value = result.get("metrics", {}).get(spec.metric) if result.get("status") == "ok" else None
    return None if value is None or math.isnan(value) else float(value)


def short_names(spec: SweepSpec) -> dict[str, str]:
    """Column names: a key's last dotted part where that is unambiguous."""
    last = [p.name.rsplit(".", 1)[-1] for p in spec.parameters]
    return {
        p.name: s if last.count(s) == 1 else p.name
        for p, s in zip(spec.parameters, last, strict=True)
    }


def write_results(spec: SweepSpec, sweep_dir: str | Path) -> tuple[list[dict], str]:
    """Collects every ``trial_*/result.json`` into ``results.csv`` (all metrics) and
    ``results.md`` (the sweep metric and ``metric.report``), best first.

    Returns:
        The results in table order and the markdown table.
    """
    sweep_dir = Path(sweep_dir)
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trial_*/result.json"))]
    sign = -1 if spec.goal == "maximize" else 1
    results.sort(key=lambda r: (metric_value(spec, r) is None, sign * (metric_value(spec, r) or 0)))
    names, short = [p.name for p in spec.parameters], short_names(spec)
    metrics = sorted({k for r in results for k in r.get("metrics", {})} - {spec.metric})
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", *names, spec.metric, *metrics, "seconds", "error"])
        for r in results:
            m, error = r.get("metrics", {}), (r.get("error") or "").split("\n", 1)[0]
            writer.writerow(
                [
                    r["trial"],
                    r["status"],
                    *(r["params"].get(n, "") for n in names),
                    *(m.get(k, "") for k in (spec.metric, *metrics)),
                    r.get("seconds"),
                    error,
                ]
            )
    header = ["trial", "status", *(short[n] for n in names), spec.metric, *spec.report, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        m = r.get("metrics", {})
        cells = [
            r["trial"],
            r["status"],
            *(fmt(r["params"].get(n, "-")) for n in names),
            *(fmt(m[k]) if k in m else "-" for k in (spec.metric, *spec.report)),
            f"{r.get('seconds') or 0:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed trials:"]
        lines += [f"- {r['trial']}: {(r.get('error') or '').split(chr(10))[0]}" for r in failed]
    table = "\n".join(lines) + "\n"
    (sweep_dir / "results.md").write_text(f"# Sweep {spec.name}\n\n{table}")
    return results, table
