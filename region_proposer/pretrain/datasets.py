"""``CocoBoxDataset``: class-agnostic boxes from a COCO-format instances JSON (stage-1 data),
optionally with their category labels (for ``ProposerPretrainer(region_classifier=...)``)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.logging import MMLogger
from pycocotools.coco import COCO

from ..registry import DATASETS


@DATASETS.register_module()
class CocoBoxDataset(BaseDataset):
    """Every annotated box of a COCO instances file, as one class ("object") for the proposer.

    ``with_labels=True`` also keeps each box's category as ``gt_labels`` (M,) int64: the index
    of its ``category_id`` among the file's categories sorted by id (``metainfo["classes"]``
    lists their names in that order), for the auxiliary region classifier.

    Crowd annotations (``iscrowd=1``) are not proposals targets and are left out. A box with
    non-positive width/height or outside its image raises an error naming the file and
    annotation id; ``on_bad_box='skip'`` drops such boxes instead and logs how many.

    Args:
        ann_file: COCO instances JSON, relative to ``data_root`` unless absolute.
        data_root: Root that image ``file_name``s are relative to.
        source: Dataset name stored in each sample (selects the objectness head trained on it).
        filter_empty: Leave out images without boxes. Defaults to False (they teach "no object").
        on_bad_box: ``"raise"`` (default) or ``"skip"``.
        with_labels: Keep category labels (``gt_labels``). Defaults to False.
        **kwargs: Passed to ``mmengine.dataset.BaseDataset`` (``pipeline``, ``test_mode``, ...).
    """

    def __init__(
        self,
        ann_file: str,
        data_root: str = "",
        *,
        source: str = "default",
        filter_empty: bool = False,
        on_bad_box: str = "raise",
        with_labels: bool = False,
        **kwargs: Any,
    ) -> None:
        if on_bad_box not in ("raise", "skip"):
            raise ValueError(f"on_bad_box must be 'raise' or 'skip', got {on_bad_box!r}")
        self.source, self.filter_empty, self.on_bad_box = source, filter_empty, on_bad_box
        self.with_labels, self.num_bad_boxes = with_labels, 0
        super().__init__(ann_file=ann_file, data_root=data_root, **kwargs)

    def load_data_list(self) -> list[dict[str, Any]]:
        """One entry per image: ``img_path``, ``img_id``, ``sample_id``, ``gt_bboxes`` (M, 4)
        and, with ``with_labels``, ``gt_labels`` (M,)."""
        if not Path(self.ann_file).is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(self.ann_file)
        cat_ids = sorted(coco.getCatIds())
        if self.with_labels:
            if len(cat_ids) < 2:
                raise ValueError(
                    f"{self.ann_file}: with_labels=True needs at least 2 categories, the file has "
                    f"{len(cat_ids)} (a class-agnostic file?)"
                )
            self._metainfo["classes"] = tuple(coco.loadCats(c)[0]["name"] for c in cat_ids)
        label_of = {cat: i for i, cat in enumerate(cat_ids)}
        data_list = []
        for img_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(img_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            boxes, cats = self._boxes(anns, info)
            if self.filter_empty and len(boxes) == 0:
                continue
            entry = {}
            if self.with_labels:
                unknown = sorted({c for c in cats if c not in label_of})
                if unknown:
                    raise ValueError(
                        f"{self.ann_file}: image {img_id} has annotations of category ids "
                        f"{unknown}, which are not in 'categories'"
                    )
                entry["gt_labels"] = np.asarray([label_of[c] for c in cats], dtype=np.int64)
            data_list.append(
                {
                    "img_path": str(Path(self.data_root) / info["file_name"]),
                    "img_id": img_id,
                    "sample_id": f"{self.source}/{img_id}",
                    "source": self.source,
                    "height": info["height"],
                    "width": info["width"],
                    "gt_bboxes": boxes,
                    **entry,
                }
            )
        if self.num_bad_boxes:
            MMLogger.get_current_instance().warning(
                f"{self.ann_file}: skipped {self.num_bad_boxes} degenerate or out-of-image boxes"
            )
        return data_list

    def _boxes(
        self, anns: list[dict[str, Any]], info: dict[str, Any]
    ) -> tuple[np.ndarray, list[int]]:
        """(M, 4) float32 xyxy boxes and the M category ids of the kept annotations."""
        boxes, cats = [], []
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            problem = None
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                problem = f"degenerate bbox {ann['bbox']} (xywh)"
            elif x < 0 or y < 0 or x + w > info["width"] + 1e-3 or y + h > info["height"] + 1e-3:
                problem = (
                    f"bbox {ann['bbox']} lies outside the {info['width']}x{info['height']} image"
                )
            if problem is None:
                boxes.append([x, y, x + w, y + h])
                cats.append(ann.get("category_id"))
            elif self.on_bad_box == "raise":
                raise ValueError(f"{self.ann_file}: annotation id {ann['id']}: {problem}")
            else:
                self.num_bad_boxes += 1
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), cats
