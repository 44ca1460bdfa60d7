"""Mask metrics: referring segmentation (cIoU / gIoU, LISA's protocol) and region-mask AP."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.masks import check_rle, decode_rle
from ..registry import METRICS
from ..structures import GroundedResponse
from .task_metric import TaskMetric, require


@METRICS.register_module()
class RESMetric(TaskMetric):
    """Referring-segmentation cIoU and gIoU of the answer's first cited region, as LISA reports.

    The predicted mask is that of the first region the answer cites (first region of the first
    span citing any, spans in the parser's order, as ``RECMetric``), in original-image pixels;
    an answer citing nothing, or citing a region without a mask, predicts an empty mask. The
    target is the union of the masks of the ``meta["target"]`` regions, decoded from metainfo
    ``gt_masks_rle`` (an empty target list is an empty target).

    LISA (arXiv 2308.00692, ``utils.intersectionAndUnionGPU`` and its ``validate``): cIoU =
    sum of intersections / sum of unions over all samples; gIoU = mean over samples of
    intersection / union, where an empty prediction on an empty target scores 1. Where the
    cumulative union is 0 (every prediction and target empty) cIoU is 1 too; LISA's 1e-10
    epsilon would give 0 there.

    Keys: ``cIoU``, ``gIoU``, ``no_region`` (share of answers citing nothing), ``count``.

    Args:
        tasks: Record tasks scored. Defaults to ``("res",)``.
        dataset_name: Inserted in the keys (``res/<name>/cIoU``) when given.
        prefix: Key prefix. Defaults to ``"res"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "res"
    default_tasks = ("res",)

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Intersection and union pixel counts of one sample (and whether it cited nothing)."""
        owner = type(self).__name__
        sample_id = sample.get("sample_id")
        rles = require(sample, "gt_masks_rle", owner)
        targets = require(sample, "meta", owner).get("target")
        if targets is None:
            raise KeyError(f"{owner} needs meta['target'] (record regions of the referent)")
        height, width = _image_size(sample, rles, owner)
        target = np.zeros((height, width), dtype=bool)
        for index in targets:
            rle = rles[int(index)]
            if rle is None:
                raise ValueError(
                    f"{owner}: sample {sample_id!r}: target region {int(index)} has no "
                    "ground-truth mask"
                )
            where = f"sample {sample_id!r}: gt_masks_rle[{index}]"
            target |= _decode(rle, height, width, where).astype(bool)
        response: GroundedResponse = require(sample, "pred_response", owner)
        first = _first_cited_region(response)
        pred = np.zeros_like(target)
        if first is not None and response.regions[first].mask is not None:
            where = f"sample {sample_id!r}: predicted mask of region {first}"
            pred = _decode(response.regions[first].mask, height, width, where).astype(bool)
        return {
            "intersection": int((pred & target).sum()),
            "union": int((pred | target).sum()),
            "no_region": first is None,
        }

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """cIoU, gIoU and the no-region share over every stored sample."""
        intersection = sum(r["intersection"] for r in results)
        union = sum(r["union"] for r in results)
        per_sample = [r["intersection"] / r["union"] if r["union"] else 1.0 for r in results]
        return {
            "cIoU": intersection / union if union else 1.0,
            "gIoU": float(np.mean(per_sample)),
            "no_region": sum(r["no_region"] for r in results) / len(results),
            "count": len(results),
        }


@METRICS.register_module()
class RegionMaskAPMetric(TaskMetric):
    """Class-agnostic COCO mask AP of the regions that answers cite (pycocotools, ``segm``).

    Every scored sample is one COCO image (the same picture appears once per record). Ground
    truth: the masks of the regions the reference answer cites (metainfo ``answer_regions``,
    each region once; regions without a mask are left out). Detections: every region the
    predicted answer cites, once, with its ``score`` and mask; a cited region without a mask is
    an empty mask, i.e. a false positive. ``COCOeval(iouType="segm")`` with ``useCats=0`` and
    its default 100 detections per image.

    Keys: ``AP`` (IoU 0.50:0.95), ``AP50``, ``count``. With no detection at all both APs are 0;
    with no ground-truth mask at all they are undefined and left out.

    Args:
        tasks: Record tasks scored. Defaults to ``("rec", "res", "multi_grounding")``.
        dataset_name: Inserted in the keys (``mask/<name>/AP``) when given.
        prefix: Key prefix. Defaults to ``"mask"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "mask"
    default_tasks = ("rec", "res", "multi_grounding")

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's image size, ground-truth RLE counts and scored detection counts."""
        owner = type(self).__name__
        sample_id = sample.get("sample_id")
        rles = require(sample, "gt_masks_rle", owner)
        height, width = _image_size(sample, rles, owner)
        gts = []
        for index in dict.fromkeys(int(i) for i in require(sample, "answer_regions", owner)):
            if rles[index] is not None:
                where = f"sample {sample_id!r}: gt_masks_rle[{index}]"
                gts.append(_counts(rles[index], height, width, where))
        response: GroundedResponse = require(sample, "pred_response", owner)
        empty = _as_str(mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))["counts"])
        dets = []
        for region_id in dict.fromkeys(r for span in response.spans for r in span.region_ids):
            region = response.regions[region_id]
            where = f"sample {sample_id!r}: predicted mask of region {region_id}"
            counts = empty if region.mask is None else _counts(region.mask, height, width, where)
            dets.append((counts, float(region.score)))
        return {"sample_id": sample_id, "height": height, "width": width, "gts": gts, "dets": dets}

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """COCO mask AP and AP50 over every stored sample."""
        out: dict[str, float] = {"count": len(results)}
        if not any(r["gts"] for r in results):
            return out  # AP is undefined without ground truth
        if not any(r["dets"] for r in results):
            return {"AP": 0.0, "AP50": 0.0, **out}  # pycocotools' loadRes fails on no results
        # In sample order, so that tied scores rank the same whatever order the samples were
        # evaluated in (COCOeval sorts detections stably by score).
        gt, dets = _coco_inputs(sorted(results, key=lambda r: str(r.get("sample_id"))))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="segm")
            evaluator.params.useCats = 0
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]), **out}


def _coco_inputs(results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The COCO ground-truth dataset dict and the detection list of the stored samples."""
    images, annotations, dets = [], [], []
    for image_id, r in enumerate(results, start=1):
        size = [r["height"], r["width"]]
        images.append({"id": image_id, "height": r["height"], "width": r["width"]})
        for counts in r["gts"]:
            rle = {"size": size, "counts": counts}
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )
        for counts, score in r["dets"]:
            rle = {"size": size, "counts": counts}
            dets.append(
                {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score}
            )
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    return gt, dets


def _first_cited_region(response: GroundedResponse) -> int | None:
    """Index of the first region of the first span citing any, or None."""
    return next((span.region_ids[0] for span in response.spans if span.region_ids), None)


def _image_size(sample: dict[str, Any], rles: Sequence[Any], owner: str) -> tuple[int, int]:
    """(height, width) of the original image: ``ori_shape``, else any region mask's size."""
    if "ori_shape" in sample:
        height, width = sample["ori_shape"][:2]
        return int(height), int(width)
    for rle in rles:
        if rle is not None:
            return int(rle["size"][0]), int(rle["size"][1])
    raise KeyError(f"{owner} needs metainfo 'ori_shape' (no region has a mask to size it by)")


def _decode(rle: Any, height: int, width: int, where: str) -> np.ndarray:
    """(height, width) uint8 mask of a checked RLE; errors name ``where``."""
    try:
        return decode_rle(rle, height, width)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _counts(rle: Any, height: int, width: int, where: str) -> str:
    """The counts of an RLE checked to be (height, width), as str (small, picklable)."""
    try:
        check_rle(rle, height, width)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return _as_str(rle["counts"])


def _as_str(counts: str | bytes) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
