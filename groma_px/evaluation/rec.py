"""``RECMetric``: referring-expression accuracy of the first cited region (Groma's protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchvision.ops import box_iou

from ..registry import METRICS
from .task_metric import TaskMetric, boxes_tensor, cited_boxes, require


@METRICS.register_module()
class RECMetric(TaskMetric):
    """Accuracy@IoU of the answer's first cited region against the referred object.

    Groma (arXiv 2404.13013) scores REC by the first box of the answer: a hit when its
    IoU with the target box is above ``iou_thr`` (strictly: an IoU of exactly 0.5 is a miss). The
    first box is the first region of the first span that cites any, spans in the parser's order
    (:func:`~groma_px.evaluation.task_metric.cited_boxes`); an answer citing none is a miss. The
    target is ``meta["target"][0]``, an index into ``gt_boxes_original``.

    Keys: ``acc@<thr>`` (hit share), ``ceiling`` (share of samples whose kept region set, the
    regions the LLM could cite, holds a box with IoU > ``iou_thr`` with the target: the oracle
    upper bound of the accuracy), ``no_region`` (share of answers citing nothing) and ``count``
    (samples scored). When every sample's ``meta`` says whether its expression is relational
    (``meta["relational"]``, as the synthetic scenes write it), ``relational/acc@<thr>``,
    ``relational/count`` and the same for ``plain`` split the accuracy by kind.

    Args:
        iou_thr: IoU a hit must exceed. Defaults to 0.5.
        tasks: Record tasks scored. Defaults to ``("rec",)``.
        dataset_name: Inserted in the keys (``rec/<name>/acc@0.5``) when given.
        prefix: Key prefix. Defaults to ``"rec"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "rec"
    default_tasks = ("rec",)

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
        """Hit, ceiling and no-region flags of one sample."""
        owner = type(self).__name__
        target = boxes_tensor(require(sample, "gt_boxes_original", owner))[
            _target_index(sample, owner)
        ][None]
        kept = boxes_tensor(require(sample, "kept_boxes", owner))
        cited = cited_boxes(require(sample, "pred_response", owner))
        hit = bool(cited) and float(box_iou(boxes_tensor(cited[0]), target)) > self.iou_thr
        ceiling = len(kept) > 0 and bool((box_iou(kept, target) > self.iou_thr).any())
        result = {"hit": hit, "ceiling": ceiling, "no_region": not cited}
        relational = require(sample, "meta", owner).get("relational")
        if relational is not None:
            result["relational"] = bool(relational)
        return result

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Shares of hits, reachable targets and region-less answers."""
        num = len(results)
        acc = f"acc@{self.iou_thr:g}"
        out = {
            acc: sum(r["hit"] for r in results) / num,
            "ceiling": sum(r["ceiling"] for r in results) / num,
            "no_region": sum(r["no_region"] for r in results) / num,
            "count": num,
        }
        if all(r.get("relational") is not None for r in results):
            for kind, flag in (("relational", True), ("plain", False)):
                group = [r["hit"] for r in results if r["relational"] is flag]
                if group:
                    out[f"{kind}/{acc}"] = sum(group) / len(group)
                out[f"{kind}/count"] = len(group)
        return out


def _target_index(sample: dict[str, Any], owner: str) -> int:
    """``meta["target"][0]``: the record-region index of the referred object."""
    targets = require(sample, "meta", owner).get("target") or []
    if not targets:
        raise KeyError(f"{owner} needs meta['target'] (record-region index of the referent)")
    return int(targets[0])
