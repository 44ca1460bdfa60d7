"""``GroundingLoggerHook``: throughput, proposer diagnostics and example answers for the
visualizer's backends (scalars to all of them; histograms and tables to W&B runs only)."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmengine.runner import BaseLoop
from mmengine.structures import BaseDataElement, InstanceData
from mmengine.visualization import WandbVisBackend
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from region_proposer.box_ops import denormalize_boxes
from region_proposer.evaluation.recall import average_recall
from region_proposer.pretrain.transforms import to_original_boxes

from ...registry import HOOKS
from ...visualization import add_caption, draw_response

EXAMPLE_COLUMNS = ("sample_id", "task", "image", "question", "answer", "reference")


@HOOKS.register_module()
class GroundingLoggerHook(Hook):
    """Logs what mmengine's ``LoggerHook`` does not, through ``runner.visualizer``.

    - ``throughput``: training samples per second (all ranks) over the last ``window``
      iterations, put in the message hub as ``train/throughput`` so that ``LoggerHook`` logs it
      with the losses and lr at every logger interval.
    - After each validation / test epoch (``{split}`` = ``val`` / ``test``): the test metrics
      as ``test/<metric>`` (mmengine sends only validation metrics to the visualizer) and
      proposer diagnostics ``{split}/proposer/...``: ``AR@k`` of all valid proposals
      (class-agnostic, IoU 0.50:0.95), ``region_set_recall@t`` (share of ground-truth boxes with
      a kept region of IoU >= t; the kept set includes user boxes), ``num_kept`` (mean kept
      regions per sample) and ``num_proposals`` (mean valid proposals per sample).
    - To W&B runs only: ``{split}/proposer/scores``, a histogram of the valid proposals'
      scores, and ``{split}/examples``, a table of the first ``num_examples`` answers
      (columns ``EXAMPLE_COLUMNS``; the image shows the cited regions and the text).

    Proposals are those a predicted sample reports (``proposals``: ``InstanceData`` with
    normalised ``bboxes``, ``scores`` and metainfo ``valid_size``; ``GromaPX`` reports them after
    its box refiner, one set per sample even when records of one image share a perception pass),
    else they are read with a forward hook on the model's ``proposer`` submodule during
    evaluation (its ``FeaturePyramid`` input gives the valid sizes); kept regions, ground truth
    and answers come from the predicted data samples (``kept_boxes``, ``gt_boxes_original``,
    ``pred_response``, metainfo ``img_path``), so any part a model does not provide is skipped.
    In distributed runs the diagnostics cover rank 0's share of the data. Records that repeat
    an image with the same ground truth and proposals (a REC question, a caption and a count of
    one picture) count once, as the stage-1 ``ProposalRecallMetric`` counts each image once
    (and COCOeval's pure-Python matching ran once per record: 2,531 records, 25 s, for 200
    test images); kept regions count once per distinct set (prompts add user boxes).

    Args:
        window: Iterations averaged for throughput. Defaults to the ``LoggerHook`` interval.
        num_examples: Rows of the examples table. Defaults to 8.
        num_bins: Bins of the score histogram. Defaults to 32.
        max_dets: AR@k values. Defaults to (1, 10, 100).
        iou_thrs: IoU thresholds of region-set recall. Defaults to (0.5,).
    """

    priority = "NORMAL"  # after IterTimerHook (NORMAL, registered first), before LoggerHook

    def __init__(
        self,
        *,
        window: int | None = None,
        num_examples: int = 8,
        num_bins: int = 32,
        max_dets: Sequence[int] = (1, 10, 100),
        iou_thrs: Sequence[float] = (0.5,),
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"GroundingLoggerHook.window must be >= 1, got {window}")
        if num_examples < 0 or num_bins < 1:
            raise ValueError(
                "GroundingLoggerHook needs num_examples >= 0 and num_bins >= 1, got "
                f"{num_examples} and {num_bins}"
            )
        self.window, self.num_examples, self.num_bins = window, num_examples, num_bins
        self.max_dets, self.iou_thrs = tuple(max_dets), tuple(iou_thrs)
        self._timing: deque[tuple[int, float]] = deque(maxlen=window or 1)
        self._handle: Any = None
        self._reset()

    # ---- throughput ------------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        """Sizes the throughput window (the logger interval unless ``window`` was given)."""
        interval = next((h.interval for h in runner.hooks if isinstance(h, LoggerHook)), 10)
        self._timing = deque(maxlen=self.window or interval)

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        """Updates ``train/throughput`` from the batch size and ``IterTimerHook``'s time."""
        seconds = runner.message_hub.log_scalars.get("train/time")
        if seconds is None or data_batch is None:
            return
        self._timing.append((_batch_size(data_batch) * get_world_size(), seconds.current()))
        total = sum(t for _, t in self._timing)
        if total > 0:
            samples = sum(n for n, _ in self._timing)
            runner.message_hub.update_scalar("train/throughput", samples / total)

    # ---- evaluation ------------------------------------------------------------------------
    def before_val_epoch(self, runner: Any) -> None:
        """Starts collecting proposals, kept regions and examples."""
        self._start(runner)

    def before_test_epoch(self, runner: Any) -> None:
        """Starts collecting proposals, kept regions and examples."""
        self._start(runner)

    def after_val_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        """Collects the batch's predictions."""
        self._collect(outputs or [])

    def after_test_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        """Collects the batch's predictions."""
        self._collect(outputs or [])

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Logs the validation diagnostics (the metrics are logged by ``LoggerHook``)."""
        self._finish(runner, "val", {})

    def after_test_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Logs the test metrics and diagnostics."""
        self._finish(runner, "test", metrics or {})

    def _reset(self) -> None:
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._scores: list[np.ndarray] = []
        self._num_proposals: list[int] = []
        self._ar_inputs: list[dict[str, Any]] = []
        self._num_kept: list[int] = []
        self._hits = dict.fromkeys(self.iou_thrs, 0)
        self._num_gt = 0
        self._seen: set[tuple] = set()  # (what, image, digest of the boxes) already counted
        self._examples: list[list[Any]] = []
        self._runs: list[Any] = []
        self._mismatch = False

    def _start(self, runner: Any) -> None:
        self._remove_handle()
        self._reset()
        self._runs = wandb_runs(runner.visualizer) if is_main_process() else []
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        proposer = getattr(model, "proposer", None)
        if isinstance(proposer, nn.Module):
            self._handle = proposer.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: keeps the proposals and the valid size of each image."""
        feats = args[0] if args else next(iter(kwargs.values()), None)
        if not all(hasattr(output, k) for k in ("boxes", "scores", "valid")) or feats is None:
            return
        sizes = getattr(feats, "valid_sizes", None)
        if sizes is None:
            sizes = torch.tensor([list(feats.image_size)] * len(output.boxes))
        parts = (output.boxes, output.scores, output.valid, sizes)
        self._pending.append(tuple(t.detach().float().cpu() for t in parts))

    def _collect(self, samples: Sequence[Any]) -> None:
        pending, self._pending = self._pending, []
        reported = [_reported_proposals(s) for s in samples]
        if samples and all(r is not None for r in reported):
            pending = []  # the model reports each sample's proposals: no need for the capture
        else:
            reported = [None] * len(samples)
        proposals = pending[0] if len(pending) == 1 else None
        if proposals is not None and len(proposals[0]) != len(samples):
            proposals = None
        if proposals is None and pending and not self._mismatch:
            self._mismatch = True  # e.g. a model that runs its proposer twice per batch
            print_log(
                "GroundingLoggerHook: proposer calls do not match the batches; "
                "proposal statistics skip those batches",
                logger="current",
            )
        for b, sample in enumerate(samples):
            if not isinstance(sample, BaseDataElement):
                continue  # a model whose predictions are not data samples: nothing to read
            if reported[b] is not None:
                self._add_proposals(sample, *reported[b])
            elif proposals is not None:
                self._add_proposals(sample, *(t[b] for t in proposals))
            self._add_regions(sample)
            if self._runs and len(self._examples) < self.num_examples:
                row = example_row(sample)
                if row is not None:
                    self._examples.append(row)

    def _add_proposals(
        self, sample: Any, boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, size: Any
    ) -> None:
        boxes, scores = boxes[valid.bool()], scores[valid.bool()]
        gt = sample.get("gt_boxes_original")
        meta = sample.metainfo
        if self._repeated(
            "proposals", meta, boxes, scores, size, None if gt is None else _boxes(gt)
        ):
            return
        self._scores.append(scores.numpy())
        self._num_proposals.append(len(scores))
        if gt is None or "ori_shape" not in meta:
            return
        original = to_original_boxes(denormalize_boxes(boxes, size.long().tolist()), meta)
        self._ar_inputs.append(
            {
                "ori_shape": tuple(meta["ori_shape"]),
                "boxes": original.numpy().reshape(-1, 4),
                "scores": scores.numpy(),
                "gt_bboxes": _boxes(gt).numpy(),
            }
        )

    def _add_regions(self, sample: Any) -> None:
        kept, gt = sample.get("kept_boxes"), sample.get("gt_boxes_original")
        if kept is None:
            return
        kept = _boxes(kept)
        gt = None if gt is None else _boxes(gt)
        if self._repeated("regions", sample.metainfo, kept, gt):
            return
        self._num_kept.append(len(kept))
        if gt is None:
            return
        self._num_gt += len(gt)
        if len(gt) and len(kept):
            best = box_iou(gt, kept).max(dim=1).values
            for t in self.iou_thrs:
                self._hits[t] += int((best >= t).sum())

    def _repeated(self, what: str, meta: Any, *tensors: Any) -> bool:
        """Whether an earlier sample of this epoch had the same image and these tensors
        (records without an image path always count)."""
        image = meta.get("img_path") if hasattr(meta, "get") else None
        if image is None:
            return False
        digest = hashlib.blake2b(digest_size=16)
        for t in tensors:
            data = (
                b"none" if t is None else torch.as_tensor(t).float().contiguous().numpy().tobytes()
            )
            digest.update(len(data).to_bytes(8, "little") + data)
        key = (what, image, digest.digest())
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def _finish(self, runner: Any, split: str, metrics: dict[str, Any]) -> None:
        self._remove_handle()
        scalars = {f"{split}/{k}": v for k, v in metrics.items()}
        scalars.update(self._diagnostics(f"{split}/proposer"))
        scalars = {k: float(v) for k, v in scalars.items() if _finite(v)}
        if scalars:
            runner.visualizer.add_scalars(scalars, step=_current_iter(runner))
        if self._runs:
            self._log_media(split)
        self._reset()

    def _diagnostics(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._ar_inputs:
            ar = average_recall(self._ar_inputs, self.max_dets)
            out.update({f"{prefix}/{k}": v for k, v in ar.items()})
        if self._num_gt:
            for t in self.iou_thrs:
                out[f"{prefix}/region_set_recall@{t:g}"] = self._hits[t] / self._num_gt
        if self._num_kept:
            out[f"{prefix}/num_kept"] = float(np.mean(self._num_kept))
        if self._num_proposals:
            out[f"{prefix}/num_proposals"] = float(np.mean(self._num_proposals))
        return out

    def _log_media(self, split: str) -> None:
        import wandb  # only reached with a W&B run

        media: dict[str, Any] = {}
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        if scores.size:
            media[f"{split}/proposer/scores"] = wandb.Histogram(scores, num_bins=self.num_bins)
        if self._examples:
            rows = [
                [wandb.Image(c) if isinstance(c, Image.Image) else c for c in row]
                for row in self._examples
            ]
            media[f"{split}/examples"] = wandb.Table(columns=list(EXAMPLE_COLUMNS), data=rows)
        for run in self._runs if media else []:
            run.log(media)

    def _remove_handle(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _reported_proposals(sample: Any) -> tuple[torch.Tensor, ...] | None:
    """``(boxes, scores, valid, valid size)`` from a predicted sample's own ``proposals``
    (``InstanceData`` with normalised ``bboxes``, ``scores`` and metainfo ``valid_size``, as
    ``GromaPX`` reports them), or None."""
    proposals = sample.get("proposals") if isinstance(sample, BaseDataElement) else None
    if not isinstance(proposals, InstanceData) or "valid_size" not in proposals.metainfo:
        return None
    scores = proposals.scores.detach().float().cpu()
    return (
        proposals.bboxes.detach().float().cpu(),
        scores,
        torch.ones(len(scores), dtype=torch.bool),
        torch.tensor(proposals.metainfo["valid_size"]),
    )


def wandb_runs(visualizer: Any) -> list[Any]:
    """The W&B runs (or, for mmengine's own backend, the ``wandb`` module) of a visualizer's
    enabled W&B backends, started if needed."""
    # mmengine 0.10.7's Visualizer lists its backends only in ``_vis_backends`` (names are free).
    backends = getattr(visualizer, "_vis_backends", {}).values()
    runs = [b.experiment for b in backends if isinstance(b, WandbVisBackend)]
    return [run for run in runs if run is not None]


def example_row(sample: Any) -> list[Any] | None:
    """One row of the examples table (``EXAMPLE_COLUMNS``), or None without an answer or image.

    The image shows the regions the answer cites, labelled by phrase, with the question, the
    answer and the reference written underneath (as ``tools/quickstart.py`` draws them).
    """
    response, meta = sample.get("pred_response"), sample.metainfo
    if response is None or not meta.get("img_path"):
        return None
    question = (meta.get("question") or "").replace("<image>", "").strip()
    reference = str(meta.get("answer", ""))
    with Image.open(meta["img_path"]) as img:
        image = draw_response(img.convert("RGB"), response)
    lines = ([f"Q: {question}"] if question else []) + [f"A: {response.raw_text}"]
    image = add_caption(image, lines + [f"reference: {reference}"])
    task, sample_id = str(meta.get("task", "")), str(meta.get("sample_id", ""))
    return [sample_id, task, image, question, response.raw_text, reference]


def _current_iter(runner: Any) -> int:
    """``runner.iter`` if training has started, else 0: reading ``runner.iter`` builds the train
    loop (and its dataloader), which a test-only run must not do (as mmengine's LoggerHook)."""
    return runner.iter if isinstance(getattr(runner, "_train_loop", None), BaseLoop) else 0


def _batch_size(data_batch: Any) -> int:
    """Samples in a collated batch (``inputs`` or ``data_samples`` of a dict, else its length)."""
    if isinstance(data_batch, dict):
        for key in ("inputs", "data_samples"):
            if key in data_batch:
                return len(data_batch[key])
    return len(data_batch)


def _boxes(boxes: Any) -> torch.Tensor:
    return torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)


def _finite(value: Any) -> bool:
    """True for a finite real number (Python, numpy or 0-d tensor)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    return isinstance(value, (int, float, np.number)) and math.isfinite(float(value))
