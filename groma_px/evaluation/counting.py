"""``CountingMetric``: exact-match accuracy of the first number in a counting answer."""

from __future__ import annotations

from typing import Any

from ..registry import METRICS
from .task_metric import TaskMetric, require
from .text import parse_count


@METRICS.register_module()
class CountingMetric(TaskMetric):
    """Share of counting answers whose first number equals ``meta["count"]``.

    The number is the first integer of the answer text, in digits or as an English word from
    zero to twenty (:func:`~groma_px.evaluation.text.parse_count`); an answer without one is
    wrong.

    Keys: ``acc``, ``unparsed`` (share of answers naming no number), ``count``.

    Args:
        tasks: Record tasks scored. Defaults to ``("counting",)``.
        dataset_name: Inserted in the keys (``count/<name>/acc``) when given.
        prefix: Key prefix. Defaults to ``"count"``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_prefix = "count"
    default_tasks = ("counting",)

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Parsed and reference counts of one sample."""
        owner = type(self).__name__
        meta = require(sample, "meta", owner)
        if "count" not in meta:
            raise KeyError(f"{owner} needs meta['count'] (the reference count)")
        return {
            "pred": parse_count(require(sample, "pred_response", owner).text),
            "ref": int(meta["count"]),
        }

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Accuracy and unparsed share over every stored sample."""
        num = len(results)
        return {
            "acc": sum(r["pred"] == r["ref"] for r in results) / num,
            "unparsed": sum(r["pred"] is None for r in results) / num,
            "count": num,
        }
