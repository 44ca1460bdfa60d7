"""``GroundedConversationDataset``: reads and validates unified grounded-conversation JSONL."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmengine.dataset import BaseDataset
from mmengine.logging import MMLogger

from ..registry import DATASETS
from .validate import RecordError, RecordFieldError, RecordValidator

BAD_RECORD_POLICIES = ("raise", "skip")


def read_jsonl_records(
    path: str | Path, validator: RecordValidator
) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    """Yields ``(line_number, record)`` or ``(line_number, RecordError)`` for each non-blank line.

    Blank lines are allowed and skipped (they carry no record). Records are validated with
    ``validator``; ids must be unique within the file.
    """
    seen_ids: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, RecordError(path, line_no, "<json>", f"invalid JSON: {exc}")
                continue
            try:
                validator(record)
            except RecordFieldError as exc:
                yield line_no, RecordError(path, line_no, exc.field, exc.message)
                continue
            if record["id"] in seen_ids:
                yield (
                    line_no,
                    RecordError(
                        path,
                        line_no,
                        "id",
                        f"duplicate id {record['id']!r} (first on line {seen_ids[record['id']]})",
                    ),
                )
                continue
            seen_ids[record["id"]] = line_no
            yield line_no, record


@DATASETS.register_module()
class GroundedConversationDataset(BaseDataset):
    """Grounded conversations in the unified JSONL format (``groma_px/data/schema.py``).

    Every record is validated when the dataset loads. The first bad record raises a
    :class:`RecordError` naming the file, line and field; with ``on_bad_record='skip'`` bad records
    are left out instead, counted and logged (see :attr:`bad_records`). Nothing is altered.

    Args:
        ann_file: JSONL file, relative to ``data_root`` unless absolute.
        data_root: Root that record image paths are relative to.
        on_bad_record: ``"raise"`` (default) or ``"skip"``.
        check_images: ``"decode"`` (default), ``"exists"`` or ``"none"``; see ``RecordValidator``.
        tasks: Keep only records of these tasks. Defaults to all.
        **kwargs: Passed to ``mmengine.dataset.BaseDataset`` (``pipeline``, ``test_mode``, ...).
    """

    def __init__(
        self,
        ann_file: str,
        data_root: str = "",
        *,
        on_bad_record: str = "raise",
        check_images: str = "decode",
        tasks: list[str] | tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(
                f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}"
            )
        self.on_bad_record = on_bad_record
        self.check_images = check_images
        self.tasks = tuple(tasks) if tasks is not None else None
        self.bad_records: list[RecordError] = []
        super().__init__(ann_file=ann_file, data_root=data_root, **kwargs)

    def load_data_list(self) -> list[dict[str, Any]]:
        """Reads, validates and returns the records, each with ``img_path`` added."""
        if not Path(self.ann_file).is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        validator = RecordValidator(self.data_root, check_images=self.check_images)
        data_list = []
        self.bad_records = []
        for _, item in read_jsonl_records(self.ann_file, validator):
            if isinstance(item, RecordError):
                if self.on_bad_record == "raise":
                    raise item
                self.bad_records.append(item)
                continue
            if self.tasks is not None and item["task"] not in self.tasks:
                continue
            item["img_path"] = str(Path(self.data_root) / item["image"])
            data_list.append(item)
        self._log_bad_records()
        return data_list

    def _log_bad_records(self) -> None:
        if not self.bad_records:
            return
        by_field = Counter(err.field for err in self.bad_records)
        summary = ", ".join(f"{field}: {n}" for field, n in by_field.most_common())
        logger = MMLogger.get_current_instance()
        logger.warning(
            f"{self.ann_file}: skipped {len(self.bad_records)} bad records ({summary}); "
            f"first: {self.bad_records[0]}"
        )
