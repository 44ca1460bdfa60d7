"""Throughput of the synthetic-scenes generator with 1 and 2 workers; prints a table, writes JSON.

    python benchmarks/bench_synthetic.py --num-images 1000 --workers 1 2

Each run generates ``--num-images`` training images (plus nothing else) into a fresh temporary
directory; the figures are wall-clock seconds as measured, including pool start-up and writing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from groma_px.data.synthetic import GENERATOR_VERSION, generate_dataset

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_synthetic.json"


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(num_images: int, workers: list[int], seed: int) -> list[dict]:
    """One generation per worker count; returns a row of measurements each."""
    rows = []
    for num_workers in workers:
        with tempfile.TemporaryDirectory() as tmp:
            summary = generate_dataset(tmp, num_images, 0, 0, seed, workers=num_workers)
            train = summary["splits"]["train"]
            rows.append(
                {
                    "workers": num_workers,
                    "images": train["images"],
                    "objects": train["objects"],
                    "records": sum(train["records"].values()),
                    "seconds": round(summary["seconds"], 3),
                    "images_per_second": round(summary["images_per_second"], 1),
                    "megabytes": round(_dir_bytes(Path(tmp)) / 2**20, 1),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    rows = run(args.num_images, args.workers, args.seed)
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths, strict=True)))
    result = {
        "benchmark": "synthetic_generation",
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
