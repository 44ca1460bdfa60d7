"""``ProposalRecallMetric``: class-agnostic average recall (pycocotools) and region-set recall."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
from mmengine.evaluator import BaseMetric
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from ..registry import METRICS
from ..selection import select_regions


def _coco_from_results(results: Sequence[dict[str, Any]]) -> tuple[COCO, list[dict[str, Any]]]:
    """Builds an in-memory class-agnostic COCO ground truth and the detection list."""
    images, annotations, detections = [], [], []
    for img_id, res in enumerate(results, start=1):
        height, width = res["ori_shape"]
        images.append({"id": img_id, "height": int(height), "width": int(width)})
        for x0, y0, x1, y1 in res["gt_bboxes"].tolist():
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img_id,
                    "category_id": 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        for (x0, y0, x1, y1), score in zip(
            res["boxes"].tolist(), res["scores"].tolist(), strict=True
        ):
            detections.append(
                {
                    "image_id": img_id,
                    "category_id": 1,
                    "score": score,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, detections


def average_recall(
    results: Sequence[dict[str, Any]], max_dets: Sequence[int] = (1, 10, 100)
) -> dict[str, float]:
    """AR@k over IoU 0.50:0.95, class-agnostic (``COCOeval`` with ``useCats=0``)."""
    gt, detections = _coco_from_results(results)
    if not gt.dataset["annotations"]:
        return {f"AR@{k}": float("nan") for k in max_dets}
    if not detections:
        return {f"AR@{k}": 0.0 for k in max_dets}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.params.useCats = 0
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
    # recall: (T iou thresholds, K categories, A areas, M max_dets); area index 0 is "all".
    recall = coco_eval.eval["recall"][:, 0, 0, :]
    out = {}
    for m, k in enumerate(max_dets):
        valid = recall[:, m][recall[:, m] > -1]
        out[f"AR@{k}"] = float(valid.mean()) if valid.size else float("nan")
    return out


@METRICS.register_module()
class ProposalRecallMetric(BaseMetric):
    """Class-agnostic AR@1/10/100 and region-set recall of proposals, in original-image pixels.

    *Region-set recall@t* is the share of ground-truth boxes that have a kept region with
    IoU >= t after the selection rule (score threshold, NMS, top-K) that the LLM's region set
    uses: the ceiling for referring accuracy.

    Expects data samples with ``pred_instances`` (``bboxes`` (N, 4) absolute xyxy of the original
    image, ``scores`` (N,)), ``gt_original`` (M, 4) boxes of the original image and metainfo
    ``ori_shape``.

    Args:
        score_thr: Selection rule's score threshold. Defaults to 0.
        nms_thr: Selection rule's NMS IoU threshold (None: no NMS). Defaults to 0.7.
        top_k: Selection rule's K. Defaults to 100.
        iou_thrs: IoU thresholds of region-set recall. Defaults to (0.5,).
        max_dets: AR@k values to report. Defaults to (1, 10, 100).
        dataset_name: Inserted in the keys (``proposer/<name>/AR@100``) when given.
        prefix: Key prefix. Defaults to ``"proposer"``.
    """

    default_prefix = "proposer"

    def __init__(
        self,
        *,
        score_thr: float = 0.0,
        nms_thr: float | None = 0.7,
        top_k: int = 100,
        iou_thrs: Sequence[float] = (0.5,),
        max_dets: Sequence[int] = (1, 10, 100),
        dataset_name: str | None = None,
        prefix: str | None = None,
        collect_device: str = "cpu",
    ) -> None:
        name = prefix or self.default_prefix
        super().__init__(
            collect_device=collect_device, prefix=f"{name}/{dataset_name}" if dataset_name else name
        )
        self.score_thr, self.nms_thr, self.top_k = score_thr, nms_thr, top_k
        self.iou_thrs, self.max_dets = tuple(iou_thrs), tuple(max_dets)

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Stores boxes, scores and ground truth of each sample (original-image pixels)."""
        # mmengine's Evaluator hands metrics ``BaseDataElement.to_dict()`` of each sample:
        # metainfo and data fields flattened into one dict.
        for sample in data_samples:
            pred = sample["pred_instances"]
            self.results.append(
                {
                    "ori_shape": tuple(sample["ori_shape"]),
                    "boxes": pred["bboxes"].detach().float().cpu().numpy().reshape(-1, 4),
                    "scores": pred["scores"].detach().float().cpu().numpy().reshape(-1),
                    "gt_bboxes": sample["gt_original"]
                    .detach()
                    .float()
                    .cpu()
                    .numpy()
                    .reshape(-1, 4),
                }
            )

    def _region_set_recall(self, results: Sequence[dict[str, Any]]) -> dict[str, float]:
        hits = {t: 0 for t in self.iou_thrs}
        num_gt, num_kept = 0, 0
        for res in results:
            boxes, scores = torch.from_numpy(res["boxes"]), torch.from_numpy(res["scores"])
            keep = select_regions(
                boxes, scores, score_thr=self.score_thr, nms_thr=self.nms_thr, top_k=self.top_k
            )
            gt = torch.from_numpy(res["gt_bboxes"])
            num_gt += len(gt)
            num_kept += len(keep)
            if len(gt) == 0 or len(keep) == 0:
                continue
            best = box_iou(gt, boxes[keep]).max(dim=1).values
            for t in self.iou_thrs:
                hits[t] += int((best >= t).sum())
        out = {
            f"region_set_recall@{t:g}": hits[t] / num_gt if num_gt else float("nan")
            for t in self.iou_thrs
        }
        out["num_kept"] = num_kept / max(1, len(results))
        return out

    def compute_metrics(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """AR@k and region-set recall over every processed sample."""
        metrics = average_recall(results, self.max_dets)
        metrics.update(self._region_set_recall(results))
        return metrics
