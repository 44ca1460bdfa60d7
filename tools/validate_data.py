"""Validate grounded-conversation JSONL files and list every bad record with file, line and field.

    python tools/validate_data.py DATA_ROOT/train.jsonl [more.jsonl ...] --data-root DATA_ROOT

Exits 1 when any record is bad, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from groma_px.data.grounded_dataset import read_jsonl_records
from groma_px.data.validate import IMAGE_CHECKS, RecordError, RecordValidator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("jsonl", nargs="+", help="JSONL files in the unified record format")
    parser.add_argument(
        "--data-root", default=None, help="image root (default: each file's folder)"
    )
    parser.add_argument("--check-images", default="decode", choices=IMAGE_CHECKS)
    parser.add_argument("--max-errors", type=int, default=20, help="errors printed per file")
    args = parser.parse_args(argv)

    total_bad = 0
    for path in map(Path, args.jsonl):
        root = Path(args.data_root) if args.data_root else path.parent
        validator = RecordValidator(root, check_images=args.check_images)
        good, bad = Counter(), []
        for _, item in read_jsonl_records(path, validator):
            if isinstance(item, RecordError):
                bad.append(item)
            else:
                good[item["task"]] += 1
        tasks = ", ".join(f"{task}: {n}" for task, n in sorted(good.items()))
        print(f"{path}: {sum(good.values())} good records ({tasks}), {len(bad)} bad")
        for err in bad[: args.max_errors]:
            print(f"  {err}")
        if len(bad) > args.max_errors:
            print(f"  ... and {len(bad) - args.max_errors} more")
        total_bad += len(bad)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
