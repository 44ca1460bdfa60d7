"""``GromaPX``'s way from a batch to the LLM's input: perception (backbone, proposer, box
refiner; cached or remembered when frozen), region selection, region tokens and the spliced
input embeddings."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.structures import BaseDataElement, InstanceData
from torch import Tensor

from region_proposer.box_ops import normalize_boxes
from region_proposer.structures import FeaturePyramid, Proposals

from ..llm.sequence import build_sequence, collate_sequences
from .inputs import sample_references, splice_features
from .outputs import Perception
from .perception_cache import weights_fingerprint

# What the cached perception outputs depend on: their weights and buffers key the shared store.
PERCEPTION_MODULES = ("data_preprocessor", "backbone", "proposer", "box_refiner")


class PerceptionMixin:
    """Methods of ``GromaPX`` that perceive a batch and embed its token sequences."""

    def perceive(
        self, inputs: Tensor, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> Perception:
        """Backbone, proposer and region selection for a batch."""
        if self._cache is not None and self.training:
            if self._cache.fingerprint is None:  # weights are loaded by now: share the store
                modules = {n: getattr(self, n) for n in PERCEPTION_MODULES}
                padded = getattr(self.data_preprocessor, "pad_to_size", None)
                self._cache.share(weights_fingerprint(modules, extra=f"pad_to_size={padded}"))
            pyramids, proposals = self._cache(inputs, data_samples, valid_sizes, self._propose)
        elif self.proposer.trainable and not self.training:
            # Records of one image share evaluation batches or nearby ones: perceive it once.
            pyramids, proposals = self._recent(inputs, data_samples, valid_sizes, self._propose)
        else:
            pyramids, proposals = self._propose(inputs, data_samples, valid_sizes)
        return self.perceive_from(pyramids, proposals, data_samples, valid_sizes, image=inputs)

    def perceive_from(
        self,
        pyramids: dict[str, FeaturePyramid],
        proposals: Proposals,
        data_samples: list[BaseDataElement],
        valid_sizes: Tensor,
        image: Tensor | None = None,
    ) -> Perception:
        """Region selection per sample from computed pyramids and proposals (``image``: the
        normalised input batch, for a region encoder with a pixel branch)."""
        references = [
            sample_references(s, size) for s, size in zip(data_samples, valid_sizes, strict=True)
        ]
        selections = []
        for b, ref in enumerate(references):
            boxes = proposals.boxes[b][proposals.valid[b]]
            scores = proposals.scores[b][proposals.valid[b]]
            selections.append(
                self.selector(
                    boxes,
                    scores,
                    user_boxes=self._user_boxes(ref, boxes, scores),
                    gt_boxes=ref.gt_boxes,
                    training=self.training,
                )
            )
        return Perception(pyramids, proposals, selections, references, image)

    def _propose(
        self, inputs: Tensor, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> tuple[dict[str, FeaturePyramid], Proposals]:
        """Backbone pyramids and proposals (the proposer sees normalised GT, for oracles)."""
        trains = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            pyramids = self.backbone(inputs, valid_sizes)
        gt = [
            InstanceData(
                metainfo={"sample_id": s.metainfo.get("sample_id")},
                bboxes=normalize_boxes(s.gt_boxes.float(), size).clamp(0.0, 1.0),
            )
            for s, size in zip(data_samples, valid_sizes, strict=True)
        ]
        with torch.no_grad():
            proposals = self.proposer(pyramids[self.consumers["proposer"]], gt)
            if self.box_refiner is not None:
                proposals = self.box_refiner.refine_proposals(inputs, proposals, valid_sizes)
        return pyramids, proposals

    def _region_features(self, perception: Perception) -> tuple[Tensor, Tensor]:
        """(sum K_b, D) region tokens of the batch and (B,) offsets of each sample's rows
        (mask prompts are mask-pooled)."""
        boxes = [sel.boxes for sel in perception.selections]
        masks = [
            {
                int(sel.ref_to_region[u]): mask
                for u, mask in enumerate(ref.user_masks)
                if mask is not None and int(sel.ref_to_region[u]) >= 0
            }
            for sel, ref in zip(perception.selections, perception.references, strict=True)
        ]
        feats = self.region_encoder(
            perception.pyramids[self.consumers["region"]],
            boxes,
            image=perception.image,
            **({"masks": masks} if any(masks) else {}),
        )
        if self.region_classifier is not None:
            logits = self.region_classifier(
                perception.pyramids[self.consumers["proposer"]], boxes, image=perception.image
            )
            feats = feats + self.class_embed(logits.float().softmax(-1).to(feats.dtype))
        counts = torch.tensor([len(b) for b in boxes], device=feats.device)
        offsets = torch.cumsum(counts, 0) - counts
        return feats, offsets

    def _embed(
        self, perception: Perception, data_samples: list[BaseDataElement], *, padding_side: str
    ) -> dict[str, Tensor]:
        """Token sequences of the batch and their spliced input embeddings."""
        seqs = []
        for sample, sel, ref in zip(
            data_samples, perception.selections, perception.references, strict=True
        ):
            rows = ref.placeholder_rows(sel.ref_to_region)
            seqs.append(
                build_sequence(
                    self._user_ids(sample),
                    sample.label_mask.bool(),
                    rows,
                    ids=self.token_ids,
                    num_regions=int(sel.boxes.shape[0]),
                    num_image_tokens=self.num_image_tokens,
                    layout=self.layout,
                )
            )
        batch = collate_sequences(seqs, pad_token_id=self._pad_id, padding_side=padding_side)
        device = self.data_preprocessor.mean.device
        batch = {k: v.to(device) for k, v in batch.items()}
        region_feats, offsets = self._region_features(perception)
        image_feats = self.image_tokenizer(perception.pyramids[self.consumers["image"]])
        if self.match_embedding_scale:
            image_feats = self._to_embedding_scale(image_feats, 0)
            region_feats = self._to_embedding_scale(region_feats, 1)
        batch["inputs_embeds"] = splice_features(
            self.llm.embed_tokens(batch["input_ids"]),
            image_slots=batch["image_slots"],
            image_feats=image_feats,
            region_slots=batch["region_slots"],
            region_add=batch["region_add"],
            region_feats=region_feats,
            region_offsets=offsets,
        )
        batch["region_feats"] = region_feats
        batch["num_regions"] = [int(sel.boxes.shape[0]) for sel in perception.selections]
        batch["region_boxes"] = torch.cat(
            [sel.boxes.to(device=device, dtype=region_feats.dtype) for sel in perception.selections]
        )
        batch["user_rows"] = [
            sel.ref_to_region[: len(ref.user_boxes)].to(device)
            for sel, ref in zip(perception.selections, perception.references, strict=True)
        ]
        return batch

    def _to_embedding_scale(self, feats: Tensor, which: int) -> Tensor:
        """RMS-normalise each feature vector and scale it to the token-embedding RMS."""
        normed = feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * (self.embedding_rms * self.feature_gain[which])


def forget_recent_images(module: Any, incompatible_keys: Any) -> None:
    """Load-state-dict hook: remembered perception belongs to the weights before the load."""
    module._recent.clear()
