"""Caption metrics: CIDEr/BLEU of region captions and phrase-box F1 of grounded captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch import Tensor
from torchvision.ops import box_iou

from ..registry import METRICS
from .task_metric import TaskMetric, boxes_tensor, cited_boxes, require
from .text import caption_tokens, strip_markup


@METRICS.register_module()
class RegionCaptionMetric(TaskMetric):
    """Corpus-level CIDEr and BLEU-1..4 of the answer text against the reference answer.

    Scores come from pycocoevalcap's ``Cider`` (the CIDEr-D variant that COCO reports, unscaled:
    1.0 is not a maximum) and ``Bleu`` scorers, one reference per sample. Both texts are
    tokenised in Python (:func:`~groma_px.evaluation.text.caption_tokens`: lower case, no
    punctuation) instead of the Java ``PTBTokenizer``; the reference has its markup removed.
    CIDEr's IDF comes from the evaluated references, so it needs many samples: with one sample it
    is 0.

    Keys: ``CIDEr``, ``BLEU-1`` … ``BLEU-4``, ``count``.

    Args:
        tasks: Record tasks scored. Defaults to ``("region_caption",)``.
        dataset_name: Inserted in the keys (``caption/<name>/CIDEr``) when given.
        prefix: Key prefix. Defaults to ``"caption"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "caption"
    default_tasks = ("region_caption",)

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tokenised prediction and reference of one sample."""
        owner = type(self).__name__
        return {
            "pred": caption_tokens(require(sample, "pred_response", owner).text),
            "ref": caption_tokens(strip_markup(require(sample, "answer", owner))),
        }

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Corpus CIDEr and BLEU over every stored pair."""
        # pycocoevalcap keys samples by image id; the collected order is unique per sample.
        refs = {i: [r["ref"]] for i, r in enumerate(results)}
        preds = {i: [r["pred"]] for i, r in enumerate(results)}
        bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
        cider, _ = Cider().compute_score(refs, preds)
        out = {"CIDEr": float(cider)}
        out.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)})
        out["count"] = len(results)
        return out


@METRICS.register_module()
class GroundedCaptionMetric(TaskMetric):
    """Phrase-box precision, recall and F1 of grounded captions, micro-averaged over the dataset.

    Predicted boxes are the answer's citations, one per (span, region) pair; reference boxes are
    the reference answer's, one per placeholder (``answer_regions`` indexing
    ``gt_boxes_original``). Per image, pairs with IoU >= ``iou_thr`` are matched greedily one to
    one, highest IoU first; matches count as true positives. A ratio with a zero denominator
    (no predicted or no reference box in the whole dataset) is reported as 0.

    Keys: ``precision``, ``recall``, ``f1``, ``count``.

    Args:
        iou_thr: IoU a match must reach. Defaults to 0.5.
        tasks: Record tasks scored. Defaults to ``("grounded_caption",)``.
        dataset_name: Inserted in the keys (``gcap/<name>/f1``) when given.
        prefix: Key prefix. Defaults to ``"gcap"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "gcap"
    default_tasks = ("grounded_caption",)

    def __init__(
        self,
        *,
        iou_thr: float = 0.5,
        tasks: Sequence[str] | None = None,
        dataset_name: str | None = None,
        prefix: str | None = None,
        collect_device: str = "cpu",
    ) -> None:
        super().__init__(
            tasks=tasks, dataset_name=dataset_name, prefix=prefix, collect_device=collect_device
        )
        self.iou_thr = iou_thr

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Matched, predicted and reference citation counts of one sample."""
        owner = type(self).__name__
        gt = boxes_tensor(require(sample, "gt_boxes_original", owner))
        ref_ids = [int(i) for i in require(sample, "answer_regions", owner)]
        pred = boxes_tensor(cited_boxes(require(sample, "pred_response", owner)))
        ref = gt[ref_ids] if ref_ids else gt.new_zeros((0, 4))
        return {
            "tp": greedy_matches(pred, ref, self.iou_thr),
            "num_pred": len(pred),
            "num_ref": len(ref),
        }

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Micro precision, recall and F1 over every stored sample."""
        tp = sum(r["tp"] for r in results)
        num_pred = sum(r["num_pred"] for r in results)
        num_ref = sum(r["num_ref"] for r in results)
        precision = tp / num_pred if num_pred else 0.0
        recall = tp / num_ref if num_ref else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "count": len(results)}


def greedy_matches(pred: Tensor, ref: Tensor, iou_thr: float) -> int:
    """Number of one-to-one matches with IoU >= ``iou_thr``, taken highest IoU first.

    Args:
        pred: (P, 4) abs xyxy predicted boxes.
        ref: (R, 4) abs xyxy reference boxes, same frame.
        iou_thr: Lowest IoU of a match.

    Returns:
        The number of matched pairs (at most ``min(P, R)``).
    """
    if len(pred) == 0 or len(ref) == 0:
        return 0
    iou = box_iou(pred, ref)
    rows, cols = (iou >= iou_thr).nonzero(as_tuple=True)
    order = iou[rows, cols].argsort(descending=True, stable=True)
    used_pred, used_ref = set(), set()
    for k in order.tolist():
        p, r = int(rows[k]), int(cols[k])
        if p not in used_pred and r not in used_ref:
            used_pred.add(p)
            used_ref.add(r)
    return len(used_pred)
