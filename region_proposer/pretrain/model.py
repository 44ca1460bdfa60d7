"""``ProposerPretrainer``: stage-1 class-agnostic detection training of backbone + proposer, with
an optional auxiliary region classifier (``region_classifier.py``)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from mmengine.model import BaseModel
from mmengine.structures import BaseDataElement, InstanceData
from torch import Tensor

from ..box_ops import denormalize_boxes, normalize_boxes
from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .box_refiner import BoxRefiner  # noqa: F401  (registers the type)
from .region_classifier import RegionClassifier  # noqa: F401  (registers the type)
from .transforms import to_original_boxes


def with_in_channels(proposer: dict, backbone: Any, consumer: str) -> dict:
    """``proposer`` config with ``in_channels`` (one per level) filled from ``backbone``'s
    ``consumer`` pyramid when the proposer takes it, so widths and level counts are derived once,
    from the backbone config. Shared by every model that composes a backbone and a proposer."""
    cfg = dict(proposer)
    proposer_type = cfg.get("type")
    proposer_cls = MODELS.get(proposer_type) if isinstance(proposer_type, str) else proposer_type
    if proposer_cls is None:
        raise KeyError(f"proposer type {cfg.get('type')!r} is not registered")
    if "in_channels" in inspect.signature(proposer_cls.__init__).parameters:
        channels = backbone.out_channels(consumer)
        cfg.setdefault("in_channels", [channels] * backbone.num_levels(consumer))
    return cfg


@MODELS.register_module()
class ProposerPretrainer(BaseModel):
    """Backbone + proposer, trained on class-agnostic boxes (Groma stage 1).

    Whether the backbone trains is the encoder's ``frozen`` flag in config. ``forward`` modes:
    ``loss`` -> dict of losses; ``predict`` -> data samples with ``pred_instances`` (boxes in
    original-image pixels, scores) and ``gt_original``; ``tensor`` -> ``Proposals``.

    Args:
        backbone: ``VisionBackbone`` config.
        proposer: Proposer config (any ``BaseProposer``).
        consumer: Which of the backbone's pyramids feeds the proposer. Defaults to "proposer".
        region_classifier: Optional ``RegionClassifier`` config (``in_channels`` derived from
            the backbone): an auxiliary loss that names each ground-truth box's category from
            the pyramid, so that a backbone trained from scratch learns what tells objects
            apart, not only where they are. Needs ``gt_instances.labels`` (``CocoBoxDataset(
            with_labels=True)``). The proposer stays class-agnostic. Defaults to None.
        box_refiner: Optional ``BoxRefiner`` config: a RoI stage that tightens the proposer's
            boxes from the input pixels around them, trained on jittered ground-truth boxes
            (its own loss; no gradient into the backbone) and applied in ``predict`` and
            ``tensor`` modes to every proposal scoring at least its ``score_thr``. Defaults to
            None.
        data_preprocessor: ``ProposerDataPreprocessor`` config.
    """

    def __init__(
        self,
        *,
        backbone: dict,
        proposer: dict,
        consumer: str = "proposer",
        region_classifier: dict | None = None,
        box_refiner: dict | None = None,
        data_preprocessor: dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.backbone = MODELS.build(backbone)
        self.consumer = consumer
        self.proposer = MODELS.build(with_in_channels(proposer, self.backbone, consumer))
        self.region_classifier = None
        if region_classifier is not None:
            cfg = {"type": "RegionClassifier", **region_classifier}
            self.region_classifier = MODELS.build(with_in_channels(cfg, self.backbone, consumer))
        self.box_refiner = None
        if box_refiner is not None:
            self.box_refiner = MODELS.build({"type": "BoxRefiner", **box_refiner})
        self._check_padding()

    def _check_padding(self) -> None:
        divisor = getattr(self.data_preprocessor, "pad_size_divisor", None)
        patch = getattr(self.backbone, "patch_size", None)
        if divisor is not None and patch is not None and divisor % patch:
            raise ValueError(
                f"data_preprocessor.pad_size_divisor={divisor} must be a multiple of the "
                f"backbone patch size {patch}"
            )

    def extract_feats(self, inputs: Tensor, valid_sizes: Tensor | None) -> FeaturePyramid:
        """The proposer's pyramid for a padded batch (B, 3, H, W)."""
        pyramids = self.backbone(inputs, valid_sizes)
        if self.consumer not in pyramids:
            raise KeyError(f"backbone has no output {self.consumer!r}; outputs: {sorted(pyramids)}")
        return pyramids[self.consumer]

    @staticmethod
    def _instances(data_samples: list[BaseDataElement], valid_sizes: Tensor) -> list[InstanceData]:
        """Ground truth normalised to each unpadded image, with sample id and source."""
        instances = []
        for sample, size in zip(data_samples, valid_sizes, strict=True):
            boxes = sample.gt_instances.bboxes if "gt_instances" in sample else torch.zeros(0, 4)
            meta = {
                "sample_id": sample.metainfo.get("sample_id"),
                "source": sample.metainfo.get("source"),
            }
            instances.append(
                InstanceData(metainfo=meta, bboxes=normalize_boxes(boxes.to(size.device), size))
            )
        return instances

    @staticmethod
    def _labels(data_samples: list[BaseDataElement]) -> list[Tensor]:
        labels = []
        for sample in data_samples:
            gt = sample.gt_instances if "gt_instances" in sample else None
            if gt is None or "labels" not in gt:
                raise ValueError(
                    f"sample {sample.metainfo.get('sample_id')!r} has no gt_instances.labels: "
                    "ProposerPretrainer(region_classifier=...) needs category labels "
                    "(CocoBoxDataset(with_labels=True) on a file with real categories)"
                )
            labels.append(gt.labels)
        return labels

    def forward(
        self,
        inputs: Tensor,
        data_samples: list[BaseDataElement] | None = None,
        valid_sizes: Tensor | None = None,
        mode: str = "tensor",
    ) -> dict[str, Tensor] | list[BaseDataElement] | Proposals:
        """See the class docstring; ``valid_sizes`` (B, 2) come from the data preprocessor."""
        if valid_sizes is None:
            valid_sizes = torch.tensor([inputs.shape[-2:]] * len(inputs), device=inputs.device)
        feats = self.extract_feats(inputs, valid_sizes)
        instances = self._instances(data_samples, valid_sizes) if data_samples is not None else None
        if mode == "loss":
            if instances is None:
                raise ValueError("mode='loss' needs data_samples with gt_instances")
            _, losses = self.proposer.loss(feats, instances)
            if self.region_classifier is not None:
                labels = self._labels(data_samples)
                boxes = [inst.bboxes for inst in instances]
                losses.update(self.region_classifier.loss(feats, boxes, labels, image=inputs))
            if self.box_refiner is not None:
                boxes = [inst.bboxes for inst in instances]
                losses.update(self.box_refiner.loss(inputs, boxes, valid_sizes))
            return losses
        proposals = self.proposer(feats, instances)
        if self.box_refiner is not None:
            proposals = self.box_refiner.refine_proposals(inputs, proposals, valid_sizes)
        if mode == "tensor":
            return proposals
        if mode == "predict":
            return self._pack_predictions(proposals, data_samples or [], valid_sizes)
        raise ValueError(f"unknown mode {mode!r}; expected 'loss', 'predict' or 'tensor'")

    @staticmethod
    def _pack_predictions(
        proposals: Proposals, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> list[BaseDataElement]:
        for i, sample in enumerate(data_samples):
            valid = proposals.valid[i]
            boxes = denormalize_boxes(proposals.boxes[i][valid], valid_sizes[i])
            sample.pred_instances = InstanceData(
                bboxes=to_original_boxes(boxes, sample.metainfo), scores=proposals.scores[i][valid]
            )
            gt = sample.gt_instances.bboxes if "gt_instances" in sample else boxes.new_zeros(0, 4)
            sample.gt_original = to_original_boxes(gt, sample.metainfo)
        return data_samples

    @torch.no_grad()
    def extract_proposals(self, data: dict[str, Any]) -> tuple[list[str], Proposals]:
        """Sample ids and raw proposals of a dataloader batch (used by tools/cache_proposals.py)."""
        data = self.data_preprocessor(data, False)
        proposals = self(
            data["inputs"], data["data_samples"], data.get("valid_sizes"), mode="tensor"
        )
        return [s.metainfo["sample_id"] for s in data["data_samples"]], proposals
