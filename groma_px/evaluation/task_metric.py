"""``TaskMetric``: the base of the chat metrics, which score only samples of their own tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmengine.structures import BaseDataElement
from torch import Tensor

from ..structures import GroundedResponse


class TaskMetric(BaseMetric):
    """A ``BaseMetric`` that keeps one small picklable dict per sample of its tasks (and an
    empty dict per sample of other tasks, see :meth:`process`).

    Subclasses implement :meth:`score_sample` (one sample -> a dict of Python scalars or
    strings, so that distributed collection stays cheap) and :meth:`summarise` (all the dicts ->
    flat metric keys). Samples of other tasks are skipped; when no sample of the metric's tasks
    was seen, :meth:`compute_metrics` returns ``{}``, so one evaluator can hold a metric per task
    and run on any mix of tasks.

    Data samples follow the prediction contract of ``GromaPX.predict``: metainfo ``task``,
    ``sample_id``, ``meta``, ``answer``, ``answer_regions``; fields ``gt_boxes_original``
    (M, 4), ``kept_boxes`` (K, 4) (both abs xyxy of the original image) and ``pred_response``
    (:class:`~groma_px.structures.GroundedResponse`).

    Args:
        tasks: Record tasks this metric scores. Defaults to the subclass's ``default_tasks``.
        dataset_name: Inserted in the keys (``rec/<name>/acc@0.5``) when given.
        prefix: Key prefix. Defaults to the subclass's ``default_prefix``.
        collect_device: Where results are gathered in distributed runs. Defaults to ``"cpu"``.
    """

    default_tasks: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        tasks: Sequence[str] | None = None,
        dataset_name: str | None = None,
        prefix: str | None = None,
        collect_device: str = "cpu",
    ) -> None:
        name = prefix or self.default_prefix
        super().__init__(
            collect_device=collect_device, prefix=f"{name}/{dataset_name}" if dataset_name else name
        )
        self.tasks = tuple(tasks) if tasks is not None else self.default_tasks
        if not self.tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Scores each sample of this metric's tasks and stores the small result dict; stores
        ``{}`` for a sample of another task.

        One entry per sample, whatever its task: in distributed evaluation mmengine pads the
        ranks' shards to equal length with repeated samples, interleaves the ranks' results
        and cuts the list to the dataset size; that removes the padding only if every sample
        left exactly one entry (Groma issue 31: wrong accuracy on several GPUs). Not ``None``:
        ``collect_results`` drops ``None`` entries before cutting.
        """
        for sample in data_samples:
            # mmengine's Evaluator hands metrics ``BaseDataElement.to_dict()`` (metainfo and
            # fields in one dict); direct callers may pass the data element itself.
            fields = sample.to_dict() if isinstance(sample, BaseDataElement) else sample
            scored = fields.get("task") in self.tasks
            self.results.append(self.score_sample(fields) if scored else {})

    def compute_metrics(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Flat metric keys over every stored result of the metric's tasks; ``{}`` if none."""
        results = [r for r in results if r]  # {}: a sample of another task
        if not results:
            print_log(
                f"{type(self).__name__}: no sample of task(s) {self.tasks} was evaluated; "
                "reporting no metrics",
                logger="current",
            )
            return {}
        return self.summarise(results)

    def score_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One sample (a flat dict of metainfo and fields) -> a small picklable result dict."""
        raise NotImplementedError

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """All result dicts (at least one) -> flat metric keys without the prefix."""
        raise NotImplementedError


def require(sample: dict[str, Any], key: str, owner: str) -> Any:
    """``sample[key]``, or a ``KeyError`` naming the metric and the prediction contract."""
    if key not in sample:
        raise KeyError(
            f"{owner} needs data-sample key {key!r} (see the prediction contract of "
            f"GromaPX.predict); got keys {sorted(sample)}"
        )
    return sample[key]


def boxes_tensor(boxes: Any) -> Tensor:
    """Boxes (tensor, array or nested list) as a (N, 4) float32 CPU tensor."""
    return torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)


def cited_boxes(response: GroundedResponse) -> list[tuple[float, float, float, float]]:
    """Every (span, region) citation's box, in the response's span order; repeats kept.

    Spans are kept in the parser's order, the order of citation in the raw answer (a nested
    phrase is grounded before the phrase around it), so ``cited_boxes(r)[0]`` is
    ``groma_px.llm.parser.first_cited_box(r)``: the first region of the first span citing any.

    Args:
        response: A parsed answer.

    Returns:
        One abs xyxy box (original-image pixels) per region id of each span.
    """
    return [response.regions[r].box for span in response.spans for r in span.region_ids]
