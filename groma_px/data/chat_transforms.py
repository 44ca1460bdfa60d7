"""Transforms that turn a grounded-conversation record into image, token ids and cited boxes."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmengine.structures import BaseDataElement
from transformers import PreTrainedTokenizerBase

from ..llm.tokenizer import load_tokenizer
from ..llm.vocab import GroundingVocab
from ..registry import TRANSFORMS
from .masks import decode_rle
from .schema import ASSISTANT, HUMAN
from .templates import ConversationError, ConversationTemplate, EncodedConversation

Results = dict[str, Any]
MODES = ("train", "predict", "auto")


@TRANSFORMS.register_module()
class LoadGroundedRecord:
    """Sets ``gt_bboxes`` and ``sample_id`` (and optionally ``gt_masks``) from a record.

    ``gt_bboxes`` is (M, 4) float32 absolute xyxy of the original image, row ``i`` =
    ``regions[i]``, so the geometric transforms of ``region_proposer.pretrain.transforms`` move the
    boxes with the pixels. ``task``, ``source``, ``conversations`` and ``meta`` (``{}`` when absent)
    are kept for ``PackGroundedChatInputs``.

    With ``with_mask=True`` every region's COCO RLE is decoded into ``gt_masks``, (M, H, W) uint8
    of the original image (the record's ``height`` x ``width``), row ``i`` = ``regions[i]``, which
    the geometric transforms move with the pixels too. A region without a ``mask`` gets an
    all-zero row and ``gt_mask_valid[i] = False`` ((M,) bool), so that mask losses and metrics
    skip it instead of learning "nothing here"; records never hold empty masks (the validator
    rejects them), so a False row is the only empty one.

    Args:
        with_mask: Decode region masks. Defaults to False.
    """

    def __init__(self, *, with_mask: bool = False) -> None:
        self.with_mask = with_mask

    def __call__(self, results: Results) -> Results:
        boxes = [region["box"] for region in results["regions"]]
        results["gt_bboxes"] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        results["sample_id"] = results["id"]
        results.setdefault("meta", {})
        results["region_prompts"] = [_prompt_of(region) for region in results["regions"]]
        if self.with_mask:
            results["gt_masks"], results["gt_mask_valid"] = _decode_region_masks(results)
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(with_mask={self.with_mask})"


def _prompt_of(region: dict[str, Any]) -> dict[str, Any] | None:
    """The visual-prompt kind of a record region (None for the default box)."""
    kind = region.get("prompt", "box")
    if kind == "point":
        return {"kind": "point", "point": [float(v) for v in region["point"]]}
    return None if kind == "box" else {"kind": kind}


@TRANSFORMS.register_module()
class RandomVisualPrompts:
    """Shows the regions that human turns cite as points or masks instead of boxes, at random,
    so that one model learns every kind of visual prompt (training data is mostly boxes).

    A cited region with a valid mask becomes a point prompt with probability ``point_prob`` (a
    pixel centre drawn uniformly from its mask) or a mask prompt with probability
    ``mask_prob``; otherwise it keeps its prompt. Put it after
    ``LoadGroundedRecord(with_mask=True)`` and before any geometric transform (points are in
    original pixels; ``GromaPX`` maps them through the recorded affine). Uses numpy's global
    RNG, which mmengine seeds per worker.

    Args:
        point_prob: Probability of a point prompt. Defaults to 0.2.
        mask_prob: Probability of a mask prompt. Defaults to 0.2.
    """

    def __init__(self, *, point_prob: float = 0.2, mask_prob: float = 0.2) -> None:
        if point_prob < 0 or mask_prob < 0 or point_prob + mask_prob > 1:
            raise ValueError(
                f"point_prob={point_prob} and mask_prob={mask_prob} must be >= 0 with sum <= 1"
            )
        self.point_prob, self.mask_prob = point_prob, mask_prob

    def __call__(self, results: Results) -> Results:
        if "gt_masks" not in results:
            raise ValueError(
                f"sample {results.get('id')!r}: RandomVisualPrompts needs gt_masks; put it after "
                "LoadGroundedRecord(with_mask=True)"
            )
        cited = {
            region
            for turn in results["conversations"]
            if turn.get("from") == HUMAN
            for region in turn.get("regions", [])
        }
        prompts = list(results["region_prompts"])
        for region in sorted(cited):
            if not results["gt_mask_valid"][region]:
                continue
            draw = np.random.rand()
            if draw < self.point_prob:
                ys, xs = np.nonzero(results["gt_masks"][region])
                pick = np.random.randint(len(xs))
                prompts[region] = {"kind": "point", "point": [xs[pick] + 0.5, ys[pick] + 0.5]}
            elif draw < self.point_prob + self.mask_prob:
                prompts[region] = {"kind": "mask"}
        results["region_prompts"] = prompts
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(point_prob={self.point_prob}, mask_prob={self.mask_prob})"


def _decode_region_masks(results: Results) -> tuple[np.ndarray, np.ndarray]:
    """``(gt_masks (M, H, W) uint8, gt_mask_valid (M,) bool)`` of a record's regions.

    Raises:
        ValueError: If a region's RLE is not the record's ``height`` x ``width`` or does not
            decode (names the record id and the region).
    """
    height, width = int(results["height"]), int(results["width"])
    regions = results["regions"]
    masks = np.zeros((len(regions), height, width), dtype=np.uint8)
    valid = np.zeros(len(regions), dtype=bool)
    for i, region in enumerate(regions):
        rle = region.get("mask")
        if rle is None:
            continue
        try:
            masks[i] = decode_rle(rle, height, width)
        except ValueError as exc:
            raise ValueError(f"record {results['id']!r}: regions[{i}].mask: {exc}") from None
        valid[i] = True
    return masks, valid


@functools.cache
def cached_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """``load_tokenizer(path)``, once per process: every later call returns the same object.

    Raises:
        FileNotFoundError: If ``path`` is not a directory.
    """
    return load_tokenizer(path)


@TRANSFORMS.register_module()
class PackGroundedChatInputs:
    """Encodes the conversation and packs image, ids and boxes into ``inputs``/``data_samples``.

    The data sample (a ``BaseDataElement``) holds:

    - ``gt_boxes`` (M, 4) float absolute xyxy of the transformed image, one row per record region.
    - ``input_ids`` (L0,) long conversation ids (``ConversationTemplate``); ``<image>`` and the
      region placeholders are single ids.
    - ``label_mask`` (L0,) bool, True on supervised (assistant) positions.
    - ``ref_regions`` (P,) long record-region index cited by each placeholder of ``input_ids``, in
      order of appearance (from each turn's ``regions``).
    - ``ref_is_user`` (P,) bool, True for a placeholder of a human turn (a user/visual prompt).
    - ``gt_masks`` (M, h, w) bool of the transformed (resized, unpadded) image, rows aligned with
      ``gt_boxes``, and ``gt_mask_valid`` (M,) bool (False: the region has no mask): only when
      the pipeline decoded masks (``LoadGroundedRecord(with_mask=True)``).

    Metainfo: ``sample_id``, ``task``, ``source``, ``img_path``, ``ori_shape``, ``img_shape``,
    ``affine``, ``flip``, ``meta``, ``answer`` (raw text of the last assistant turn, None if the
    conversation ends with a human turn), ``answer_regions`` (its ``regions``), ``question``
    (the text of the last human turn, placeholders kept) and ``gt_masks_rle`` (per record region
    its COCO RLE in original-image pixels, or None: what mask metrics score against).

    In predict mode ``input_ids`` stop after the last assistant prefix: the last answer and its
    placeholders are left out of ``input_ids`` and ``ref_regions`` and kept only as metainfo.

    Args:
        tokenizer: Local tokenizer directory, loaded lazily once per process.
        template: Conversation template name (``TEMPLATE_NAMES``). Defaults to ``"groma"``.
        system: System prompt replacing the template's default. Defaults to None.
        mode: ``"train"``, ``"predict"`` or ``"auto"`` (predict when ``results["test_mode"]``
            is True; the dataset must set that key). Defaults to ``"train"``.
        max_length: Most ids of ``input_ids`` (before ``<image>`` is expanded); a longer sample
            raises instead of being truncated, which could cut a citation. Defaults to None (no
            limit).
        num_region_tokens: K of the model's ``GroundingVocab``; when given, the tokenizer must hold
            ``<r0>`` ... ``<r{K-1}>`` and a sample may cite at most K distinct regions. Defaults
            to None (no check).
        region_label_fields: Record-region fields (dotted paths into the region, e.g.
            ``("attributes.size", "attributes.color", "category")``) packed per region as the
            metainfo ``region_labels``: a tuple of the fields' string values (None where a region
            lacks one), the words the region-text alignment loss names it by (``GromaPX``'s
            ``region_text_loss``). Defaults to None (not packed).
    """

    META_KEYS = (
        "sample_id",
        "task",
        "source",
        "img_path",
        "ori_shape",
        "img_shape",
        "affine",
        "flip",
        "meta",
    )

    def __init__(
        self,
        *,
        tokenizer: str,
        template: str = "groma",
        system: str | None = None,
        mode: str = "train",
        max_length: int | None = None,
        num_region_tokens: int | None = None,
        region_label_fields: Sequence[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"PackGroundedChatInputs.mode must be one of {MODES}, got {mode!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"PackGroundedChatInputs.max_length must be >= 1, got {max_length}")
        self.tokenizer_dir = str(tokenizer)
        self.template = ConversationTemplate(template, system=system)
        self.mode = mode
        self.max_length = max_length
        self.vocab = GroundingVocab(num_region_tokens) if num_region_tokens is not None else None
        self._vocab_checked = False
        if region_label_fields is not None and (
            isinstance(region_label_fields, str) or not region_label_fields
        ):
            raise ValueError(
                "PackGroundedChatInputs.region_label_fields must be a non-empty sequence of field "
                f"paths, got {region_label_fields!r}"
            )
        self.region_label_fields = (
            None if region_label_fields is None else tuple(region_label_fields)
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (and checked against ``num_region_tokens``)."""
        tokenizer = cached_tokenizer(self.tokenizer_dir)
        if self.vocab is not None and not self._vocab_checked:
            self.vocab.token_ids(tokenizer)  # raises KeyError naming a missing token
            self._vocab_checked = True
        return tokenizer

    def __call__(self, results: Results) -> dict[str, Any]:
        sample_id = results.get("sample_id", results.get("id"))
        turns = results["conversations"]
        predict = self._is_predict(results)
        try:
            encoded = self.template.encode(turns, self.tokenizer, for_generation=predict)
        except ConversationError as exc:
            raise ValueError(f"sample {sample_id!r}: {exc}") from exc
        self._check_length(encoded, sample_id)
        last = turns[-1] if turns[-1].get("from") == ASSISTANT else None
        # In predict mode the last answer is not encoded, so its citations are not either.
        encoded_turns = turns[:-1] if predict and last is not None else turns
        ref_regions, ref_is_user = _citations(
            encoded_turns, encoded, num_regions=len(results["regions"]), sample_id=sample_id
        )
        if self.vocab is not None:
            _check_num_cited(ref_regions, self.vocab.num_region_tokens, sample_id)
        metainfo = {k: results[k] for k in self.META_KEYS if k in results}
        humans = [t["value"] for t in turns if t.get("from") == HUMAN]
        metainfo.update(
            question=humans[-1] if humans else None,
            answer=last["value"] if last is not None else None,
            answer_regions=list(last.get("regions", [])) if last is not None else [],
            gt_masks_rle=[region.get("mask") for region in results["regions"]],
            region_prompts=results.get("region_prompts"),
        )
        if self.region_label_fields is not None:
            metainfo["region_labels"] = [
                region_labels(region, self.region_label_fields, sample_id=sample_id, index=i)
                for i, region in enumerate(results["regions"])
            ]
        sample = BaseDataElement(
            metainfo=metainfo,
            gt_boxes=_gt_boxes(results, sample_id),
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            label_mask=torch.tensor(encoded.label_mask, dtype=torch.bool),
            ref_regions=torch.tensor(ref_regions, dtype=torch.long),
            ref_is_user=torch.tensor(ref_is_user, dtype=torch.bool),
        )
        if "gt_masks" in results:
            sample.gt_masks, sample.gt_mask_valid = _gt_masks(results, sample_id)
        img = torch.from_numpy(np.ascontiguousarray(results["img"].transpose(2, 0, 1)))
        return {"inputs": img, "data_samples": sample}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={self.tokenizer_dir!r}, template={self.template!r}, "
            f"mode={self.mode!r}, max_length={self.max_length})"
        )

    def _is_predict(self, results: Results) -> bool:
        if self.mode != "auto":
            return self.mode == "predict"
        if "test_mode" not in results:
            raise KeyError(
                "PackGroundedChatInputs(mode='auto') reads results['test_mode'], which the "
                "dataset did not set; use mode='train' or mode='predict' in this pipeline"
            )
        return bool(results["test_mode"])

    def _check_length(self, encoded: EncodedConversation, sample_id: Any) -> None:
        if self.max_length is not None and len(encoded.input_ids) > self.max_length:
            raise ValueError(
                f"sample {sample_id!r}: {len(encoded.input_ids)} tokens exceed "
                f"max_length={self.max_length}; samples are never truncated (that could cut a "
                "citation): drop or shorten the record, or raise max_length"
            )


def region_labels(
    region: dict[str, Any], fields: Sequence[str], *, sample_id: Any = None, index: int = 0
) -> tuple[str | None, ...]:
    """The string values of ``fields`` (dotted paths, e.g. ``"attributes.color"``) of a record
    region, None where the region lacks the field.

    Raises:
        ValueError: If a field holds something other than a string (naming sample and region).
    """
    values: list[str | None] = []
    for field in fields:
        value: Any = region
        for key in field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"sample {sample_id!r}: regions[{index}].{field} is {value!r}; region label "
                "fields must hold strings"
            )
        values.append(value or None)
    return tuple(values)


def _citations(
    turns: list[dict[str, Any]], encoded: EncodedConversation, *, num_regions: int, sample_id: Any
) -> tuple[list[int], list[bool]]:
    """The record region and the human-or-not of each placeholder of ``encoded``, in order.

    Args:
        turns: The turns that ``encoded`` holds, in order.
        encoded: Their encoding.
        num_regions: M, the number of record regions.
        sample_id: Named in errors.

    Returns:
        ``(ref_regions, ref_is_user)``, one entry per placeholder.

    Raises:
        ValueError: If a turn's ``regions`` does not have one valid index per placeholder.
    """
    ref_regions: list[int] = []
    ref_is_user: list[bool] = []
    for index, turn in enumerate(turns):
        cited = list(turn.get("regions", []))
        num_placeholders = encoded.placeholder_turns.count(index)
        if len(cited) != num_placeholders:
            raise ValueError(
                f"sample {sample_id!r}: conversations[{index}] has {num_placeholders} region "
                f"placeholders but cites {len(cited)} regions ({cited})"
            )
        bad = [r for r in cited if not 0 <= r < num_regions]
        if bad:
            raise ValueError(
                f"sample {sample_id!r}: conversations[{index}] cites regions {bad}, but the "
                f"record has {num_regions}"
            )
        ref_regions.extend(cited)
        ref_is_user.extend([turn["from"] == HUMAN] * len(cited))
    return ref_regions, ref_is_user


def _check_num_cited(ref_regions: list[int], num_region_tokens: int, sample_id: Any) -> None:
    """Each distinct cited region needs its own ``<ri>``, so at most K may be cited."""
    num_cited = len(set(ref_regions))
    if num_cited > num_region_tokens:
        raise ValueError(
            f"sample {sample_id!r} cites {num_cited} distinct regions but the vocabulary has "
            f"num_region_tokens={num_region_tokens}"
        )


def _gt_boxes(results: Results, sample_id: Any) -> torch.Tensor:
    """(M, 4) float boxes of the transformed image; row ``i`` must still be ``regions[i]``."""
    boxes = torch.as_tensor(results["gt_bboxes"], dtype=torch.float32).reshape(-1, 4)
    # ref_regions index rows by record-region index: a transform that drops boxes (RandomCrop)
    # would silently re-point every later citation.
    if boxes.shape[0] != len(results["regions"]):
        raise ValueError(
            f"sample {sample_id!r}: {boxes.shape[0]} boxes after the transforms but the record has "
            f"{len(results['regions'])} regions; do not use box-dropping transforms here"
        )
    return boxes


def _gt_masks(results: Results, sample_id: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gt_masks (M, h, w) bool, gt_mask_valid (M,) bool)`` of the transformed image."""
    masks = torch.from_numpy(np.ascontiguousarray(results["gt_masks"])).bool()
    num_regions = len(results["regions"])
    height, width = results["img"].shape[:2]
    if masks.ndim != 3 or masks.shape[0] != num_regions or masks.shape[1:] != (height, width):
        raise ValueError(
            f"sample {sample_id!r}: gt_masks of shape {tuple(masks.shape)} after the transforms, "
            f"expected ({num_regions}, {height}, {width}) (one mask per record region, image size)"
        )
    valid = results.get("gt_mask_valid")
    valid = torch.ones(num_regions, dtype=torch.bool) if valid is None else torch.as_tensor(valid)
    return masks, valid.bool().reshape(num_regions)
