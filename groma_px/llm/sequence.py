"""Expand one tokenised conversation into the LLM sequence: image slots, region block, citations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from groma_px.llm.vocab import GroundingTokenIds

#: Label of positions that the loss skips (the default ``ignore_index`` of ``F.cross_entropy``).
IGNORE_INDEX = -100
#: Region block layouts (docs/groma_px.md, "Region block layouts").
LAYOUTS = ("pair", "fused")
PADDING_SIDES = ("left", "right")


def _check_1d(owner: str, name: str, value: object, dtype: torch.dtype) -> Tensor:
    """Raise unless ``value`` is a 1-D tensor of ``dtype``; the message names ``owner.name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}.{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 1 or value.dtype != dtype:
        raise ValueError(
            f"{owner}.{name} must be 1-D {dtype}, got shape {tuple(value.shape)} {value.dtype}"
        )
    return value


def _check_count(name: str, value: object, minimum: int) -> int:
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class LLMSequence:
    """One sample's LLM input: token ids plus where image and region features go.

    Attributes:
        input_ids: (L,) long token ids; feature slots hold ``<image>``, ``<region>`` or ``<ri>``.
        labels: (L,) long next-token targets before shifting: ``input_ids`` on supervised
            positions, ``IGNORE_INDEX`` elsewhere.
        image_slots: (L,) bool; True where the embedding is replaced by the next image feature,
            in order (the G image tokens of the sample's image).
        region_slots: (L,) long; the kept-region row whose feature goes at this position, -1 for
            none.
        region_add: (L,) bool; True where the region feature is added to the ``<ri>`` embedding
            (``fused`` layout), False where it replaces the embedding. Only True on region slots.
    """

    input_ids: Tensor
    labels: Tensor
    image_slots: Tensor
    region_slots: Tensor
    region_add: Tensor

    def __post_init__(self) -> None:
        owner = type(self).__name__
        dtypes = {
            "input_ids": torch.long,
            "labels": torch.long,
            "image_slots": torch.bool,
            "region_slots": torch.long,
            "region_add": torch.bool,
        }
        for name, dtype in dtypes.items():
            value = _check_1d(owner, name, getattr(self, name), dtype)
            if value.shape != self.input_ids.shape or value.device != self.input_ids.device:
                raise ValueError(
                    f"{owner}.{name} has shape {tuple(value.shape)} on {value.device}, but "
                    f"input_ids has {tuple(self.input_ids.shape)} on {self.input_ids.device}"
                )
        has_region = self.region_slots >= 0
        if bool((self.region_add & ~has_region).any()):
            raise ValueError(f"{owner}.region_add is True where region_slots is -1")
        if bool((self.image_slots & has_region).any()):
            raise ValueError(f"{owner}: a position is both an image slot and a region slot")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def region_block_length(num_regions: int, layout: str) -> int:
    """LLM positions taken by the region block that follows the image tokens.

    Args:
        num_regions: K, the kept regions of the image.
        layout: ``"pair"`` (``<ri><region>``, 2 per region) or ``"fused"`` (``<ri>``, 1).

    Returns:
        2K for ``pair``, K for ``fused``.
    """
    _check_count("num_regions", num_regions, 0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 * num_regions if layout == "pair" else num_regions


def positions_per_image(num_image_tokens: int, num_regions: int, layout: str) -> int:
    """LLM positions one image costs: its G image tokens plus its region block.

    Args:
        num_image_tokens: G, the image tokens per image.
        num_regions: K, the kept regions of the image.
        layout: ``"pair"`` or ``"fused"``.

    Returns:
        G + 2K for ``pair``, G + K for ``fused`` (K = 100: 200 + G and 100 + G).
    """
    _check_count("num_image_tokens", num_image_tokens, 1)
    return num_image_tokens + region_block_length(num_regions, layout)


def _placeholder_mask(input_ids: Tensor, ids: GroundingTokenIds) -> Tensor:
    """(L,) bool: True on ``<refer_box>``, ``<ground_box>`` and ``<refer_feat>``."""
    placeholders = torch.tensor(
        [ids.refer_box, ids.ground_box, ids.refer_feat], device=input_ids.device
    )
    return torch.isin(input_ids, placeholders)


def _check_inputs(
    input_ids: Tensor,
    label_mask: Tensor,
    ref_to_region: Tensor,
    ids: GroundingTokenIds,
    num_regions: int,
    num_image_tokens: int,
    layout: str,
) -> None:
    """Every check of ``build_sequence`` on its arguments; see its ``Raises``."""
    owner = "build_sequence"
    _check_1d(owner, "input_ids", input_ids, torch.long)
    _check_1d(owner, "label_mask", label_mask, torch.bool)
    _check_1d(owner, "ref_to_region", ref_to_region, torch.long)
    if label_mask.shape != input_ids.shape:
        raise ValueError(
            f"label_mask has shape {tuple(label_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    positions_per_image(num_image_tokens, num_regions, layout)  # checks the sizes and layout
    if num_regions > ids.num_region_tokens:
        raise ValueError(
            f"more regions than region tokens: num_regions={num_regions}, but the vocabulary "
            f"has {ids.num_region_tokens} (<r0> ... <r{ids.num_region_tokens - 1}>)"
        )
    num_cited = int(_placeholder_mask(input_ids, ids).sum())
    if num_cited != ref_to_region.numel():
        raise ValueError(
            f"sample cites {num_cited} boxes but has {ref_to_region.numel()}: input_ids holds "
            f"{num_cited} region placeholders, ref_to_region {ref_to_region.numel()} entries"
        )
    bad = ref_to_region[(ref_to_region < 0) | (ref_to_region >= num_regions)]
    if bad.numel():
        raise ValueError(
            f"ref_to_region holds {bad.tolist()}, outside [0, num_regions={num_regions})"
        )
    num_images = int((input_ids == ids.image).sum())
    if num_images > 1:
        raise ValueError(f"input_ids holds {num_images} <image> tokens; at most 1 is allowed")
    if num_images == 0 and (num_regions or num_cited):
        # The region block follows the image: without one a citation has no target.
        raise ValueError(
            f"input_ids has no <image>, but num_regions={num_regions} and {num_cited} "
            "placeholders: regions need an image"
        )
    if bool((input_ids == ids.region).any()):
        raise ValueError("input_ids holds a literal <region>: its feature would be undefined")
    unknown = torch.tensor(ids.regions[num_regions:], dtype=torch.long, device=input_ids.device)
    if bool(torch.isin(input_ids, unknown).any()):
        raise ValueError(f"input_ids cites an <ri> with i >= num_regions={num_regions}")


def build_sequence(
    input_ids: Tensor,
    label_mask: Tensor,
    ref_to_region: Tensor,
    *,
    ids: GroundingTokenIds,
    num_regions: int,
    num_image_tokens: int,
    layout: str = "pair",
) -> LLMSequence:
    """Expand ``<image>`` and resolve the region placeholders of one tokenised conversation.

    ``<image>`` becomes G ``<image>`` slots followed by the region block (``pair``:
    ``<r0><region>…<r{K-1}><region>``, features replace the ``<region>`` embeddings; ``fused``:
    ``<r0>…<r{K-1}>``, features are added). ``<refer_box>`` and ``<ground_box>`` become ``<ri>``
    (a citation, no feature); ``<refer_feat>`` becomes ``<ri><region>`` with the feature
    replacing the ``<region>`` embedding, in both layouts. Supervised positions keep their label
    (a supervised placeholder gives a supervised ``<ri>``); image, region block and ``<region>``
    positions are never supervised. Ids already in ``input_ids`` (including ``<ri>`` with
    ``i < num_regions``) are kept.

    Args:
        input_ids: (L0,) long conversation ids with at most one ``<image>``; placeholders as
            single ids.
        label_mask: (L0,) bool; True on supervised (assistant) positions.
        ref_to_region: (P,) long kept-region row cited by each placeholder, in order.
        ids: The grounding token ids of the tokenizer.
        num_regions: K, the kept regions of this sample (rows of its region tokens).
        num_image_tokens: G, image features per image.
        layout: ``"pair"`` or ``"fused"``. Defaults to ``"pair"``.

    Returns:
        The expanded sequence, on the device of ``input_ids``; its length is
        ``L0 + P_feat + (positions_per_image(G, K, layout) - 1 if there is an image)``, where
        ``P_feat`` counts the ``<refer_feat>`` placeholders.

    Raises:
        TypeError: If a tensor argument is not a tensor.
        ValueError: On a wrong shape or dtype, an unknown layout, a bad size, K above the
            vocabulary's region tokens, a placeholder count that differs from ``P`` ("sample
            cites N boxes but has M"), a row outside ``[0, K)``, more than one ``<image>``, a
            literal ``<region>`` or ``<ri>`` with ``i >= K``, or regions or placeholders without
            an ``<image>``.
    """
    _check_inputs(input_ids, label_mask, ref_to_region, ids, num_regions, num_image_tokens, layout)
    image_pos = (input_ids == ids.image).nonzero().flatten().tolist()
    if not image_pos:
        return _text_segment(input_ids, label_mask, ref_to_region, ids)
    cut = image_pos[0]
    num_head_refs = int(_placeholder_mask(input_ids[:cut], ids).sum())
    head = _text_segment(input_ids[:cut], label_mask[:cut], ref_to_region[:num_head_refs], ids)
    tail = _text_segment(
        input_ids[cut + 1 :], label_mask[cut + 1 :], ref_to_region[num_head_refs:], ids
    )
    image = _image_block(ids, num_image_tokens, num_regions, layout, input_ids.device)
    return _concat([head, image, tail])


def _text_segment(
    input_ids: Tensor, label_mask: Tensor, refs: Tensor, ids: GroundingTokenIds
) -> LLMSequence:
    """Resolve the placeholders of a stretch without ``<image>``; ``refs`` are its (P,) rows."""
    device = input_ids.device
    region_ids = torch.tensor(ids.regions, dtype=torch.long, device=device)
    is_placeholder = _placeholder_mask(input_ids, ids)
    is_feat = input_ids == ids.refer_feat
    resolved = input_ids.clone()
    resolved[is_placeholder] = region_ids[refs.to(device)]
    labels = torch.where(label_mask, resolved, IGNORE_INDEX)
    # Each <refer_feat> gives two positions, <ri> then <region>; the rest one each.
    repeats = 1 + is_feat.long()
    source = torch.repeat_interleave(torch.arange(len(input_ids), device=device), repeats)
    feat_slot = torch.zeros(len(source), dtype=torch.bool, device=device)
    feat_slot[torch.cumsum(repeats, 0)[is_feat] - 1] = True
    out_ids = resolved[source]
    out_ids[feat_slot] = ids.region
    out_labels = labels[source]
    out_labels[feat_slot] = IGNORE_INDEX
    region_slots = torch.full_like(out_ids, -1)
    region_slots[feat_slot] = refs.to(device)[is_feat[is_placeholder]]
    no_flag = torch.zeros_like(feat_slot)
    return LLMSequence(out_ids, out_labels, no_flag, region_slots, no_flag.clone())


def _image_block(
    ids: GroundingTokenIds,
    num_image_tokens: int,
    num_regions: int,
    layout: str,
    device: torch.device,
) -> LLMSequence:
    """The G image slots followed by the region block of K regions in ``layout``."""
    rows = torch.arange(num_regions, device=device)
    index_ids = torch.tensor(ids.regions[:num_regions], dtype=torch.long, device=device)
    if layout == "pair":
        # (K, 2) pairs (<ri>, <region>) -> (2K,) interleaved
        block_ids = torch.stack([index_ids, torch.full_like(index_ids, ids.region)], 1).flatten()
        block_slots = torch.stack([torch.full_like(rows, -1), rows], 1).flatten()
    else:
        block_ids, block_slots = index_ids, rows
    num_block = len(block_ids)
    length = num_image_tokens + num_block
    image_slots = torch.zeros(length, dtype=torch.bool, device=device)
    image_slots[:num_image_tokens] = True
    region_slots = torch.full((length,), -1, dtype=torch.long, device=device)
    region_slots[num_image_tokens:] = block_slots
    region_add = torch.zeros(length, dtype=torch.bool, device=device)
    region_add[num_image_tokens:] = layout == "fused"
    image_ids = torch.full((num_image_tokens,), ids.image, dtype=torch.long, device=device)
    return LLMSequence(
        input_ids=torch.cat([image_ids, block_ids]),
        labels=torch.full((length,), IGNORE_INDEX, dtype=torch.long, device=device),
        image_slots=image_slots,
        region_slots=region_slots,
        region_add=region_add,
    )


_FIELDS = ("input_ids", "labels", "image_slots", "region_slots", "region_add")


def _concat(parts: Sequence[LLMSequence]) -> LLMSequence:
    """Join sequences end to end."""
    return LLMSequence(*(torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS))


def collate_sequences(
    seqs: Sequence[LLMSequence], *, pad_token_id: int, padding_side: str = "right"
) -> dict[str, Tensor]:
    """Pad sequences of different lengths into a batch.

    Padding positions get ``pad_token_id``, label ``IGNORE_INDEX``, attention 0, no image slot,
    region slot -1 and ``region_add`` False, so they carry no feature and no loss.

    Args:
        seqs: B sequences, all on one device.
        pad_token_id: Id written on padding positions.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation). Defaults to
            ``"right"``.

    Returns:
        ``input_ids`` (B, L) long, ``labels`` (B, L) long, ``attention_mask`` (B, L) long,
        ``image_slots`` (B, L) bool, ``region_slots`` (B, L) long, ``region_add`` (B, L) bool,
        where L is the longest sequence. Image slots in row-major order follow the samples'
        image features in order.

    Raises:
        ValueError: If ``seqs`` is empty or ``padding_side`` is unknown.
    """
    if not seqs:
        raise ValueError("collate_sequences needs at least one sequence")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    length = max(len(s) for s in seqs)
    device = seqs[0].input_ids.device
    ones = [torch.ones(len(s), dtype=torch.long, device=device) for s in seqs]
    fills: dict[str, tuple[int | bool, list[Tensor]]] = {
        "input_ids": (pad_token_id, [s.input_ids for s in seqs]),
        "labels": (IGNORE_INDEX, [s.labels for s in seqs]),
        "attention_mask": (0, ones),
        "image_slots": (False, [s.image_slots for s in seqs]),
        "region_slots": (-1, [s.region_slots for s in seqs]),
        "region_add": (False, [s.region_add for s in seqs]),
    }
    batch: dict[str, Tensor] = {}
    for name, (fill, rows) in fills.items():
        out = torch.full((len(seqs), length), fill, dtype=rows[0].dtype, device=device)
        for b, row in enumerate(rows):
            if padding_side == "right":
                out[b, : len(row)] = row
            else:
                out[b, length - len(row) :] = row
        batch[name] = out
    return batch
