"""``PerceptionCache``: keeps what frozen perception computed for an image (pyramid, proposals).

Stages 2 and 3 keep the backbone and the proposer frozen, so their outputs for an image never
change; recomputing them every epoch is about half of a CPU training step. The cache stores, per
image, each pyramid level cropped to the image's valid cells (float16) and its proposals, and
rebuilds padded batches from them. It is keyed by the image file and the transform applied
(size, flip, affine), so it must only be enabled with frozen perception (``GromaPX`` checks).
Caches bound to the same frozen weights (:meth:`PerceptionCache.share` with a
:func:`weights_fingerprint`) share one process-wide store: stage 3, which loads stage 2's
checkpoint in the same process, starts with the images stage 2 already perceived.

:class:`RecentImages` is the counterpart used outside training: records of one image (a REC
question, a caption, a count...) share batches or come in nearby ones, and an input image equal,
bit for bit, to one perceived recently (in this batch or an earlier one) is not run through
perception again.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.structures import BaseDataElement
from torch import Tensor, nn

from region_proposer.structures import FeaturePyramid, Proposals

Computed = tuple[dict[str, FeaturePyramid], Proposals]
# The store of the most recently shared weights: {(fingerprint, consumers): items}.
_SHARED: dict[tuple, dict[tuple, dict[str, Any]]] = {}


def weights_fingerprint(modules: dict[str, nn.Module | None], extra: str = "") -> str:
    """A digest of the names, shapes, dtypes and exact values of the modules' parameters and
    buffers, non-persistent ones included (``None`` modules count as absent), and ``extra``."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(extra.encode())
    for prefix, module in modules.items():
        digest.update(f"{prefix}:{module is None}".encode())
        tensors = [] if module is None else [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in tensors:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _key(sample: BaseDataElement) -> tuple:
    meta = sample.metainfo
    return (
        meta.get("img_path"),
        tuple(meta.get("img_shape", ())),
        bool(meta.get("flip", False)),
        tuple(round(float(v), 6) for v in meta.get("affine", ())),
    )


class PerceptionCache:
    """Per-image cache of frozen perception outputs.

    Args:
        consumers: Backbone outputs to keep (those the region encoder and image tokens read).
        max_items: Most images kept; beyond it, new images are computed but not stored.
            Defaults to 100000.
    """

    def __init__(self, consumers: Sequence[str], *, max_items: int = 100_000) -> None:
        self.consumers = tuple(dict.fromkeys(consumers))
        self.max_items = max_items
        self._items: dict[tuple, dict[str, Any]] = {}
        self.fingerprint: str | None = None
        self.hits = 0
        self.misses = 0

    def share(self, fingerprint: str) -> None:
        """Use the process-wide store of the perception weights ``fingerprint`` (from
        :func:`weights_fingerprint`); the store of other weights is dropped. Items this cache
        computed before it was bound are kept only when no store exists for the fingerprint."""
        key = (fingerprint, self.consumers)
        if key in _SHARED:
            print_log(
                f"PerceptionCache: {len(_SHARED[key])} images already perceived with these "
                "frozen perception weights (an earlier model in this process) are reused",
                logger="current",
            )
        else:
            _SHARED.clear()
            _SHARED[key] = self._items
        self._items = _SHARED[key]
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._items)

    def __call__(
        self,
        inputs: Tensor,
        data_samples: list[BaseDataElement],
        valid_sizes: Tensor,
        compute: Callable[[Tensor, list[BaseDataElement], Tensor], Computed],
    ) -> Computed:
        """The batch's pyramids and proposals, computing only the images not cached yet."""
        keys = [_key(s) for s in data_samples]
        missing = [i for i, k in enumerate(keys) if k not in self._items]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, dict[str, Any]] = {}
        if missing:
            index = torch.tensor(missing, device=inputs.device)
            pyramids, proposals = compute(
                inputs[index], [data_samples[i] for i in missing], valid_sizes[index]
            )
            for j, i in enumerate(missing):
                fresh[i] = self._split(pyramids, proposals, j, valid_sizes[i])
                if len(self._items) < self.max_items:
                    self._items[keys[i]] = fresh[i]
        items = [fresh.get(i) or self._items[k] for i, k in enumerate(keys)]
        return self._assemble(items, tuple(inputs.shape[-2:]), valid_sizes)

    def _split(
        self, pyramids: dict[str, FeaturePyramid], proposals: Proposals, j: int, size: Tensor
    ) -> dict[str, Any]:
        """Image j's valid cells per level (float16) and its valid proposals."""
        h, w = (int(v) for v in size)
        item: dict[str, Any] = {"image_size": pyramids[self.consumers[0]].image_size}
        for name in self.consumers:
            pyramid = pyramids[name]
            item[f"{name}/shapes"] = [tuple(m.shape[-2:]) for m in pyramid.maps]
            item[name] = [
                fmap[j, :, : _cells(h, stride, fmap.shape[-2]), : _cells(w, stride, fmap.shape[-1])]
                .detach()
                .to(torch.float16)
                .clone()
                for fmap, stride in zip(pyramid.maps, pyramid.strides, strict=True)
            ]
        valid = proposals.valid[j]
        item["boxes"] = proposals.boxes[j][valid].detach().clone()
        item["scores"] = proposals.scores[j][valid].detach().clone()
        return item

    def _assemble(
        self, items: list[dict[str, Any]], image_size: tuple[int, int], valid_sizes: Tensor
    ) -> Computed:
        sizes = {tuple(item["image_size"]) for item in items}
        if sizes != {tuple(image_size)}:
            raise ValueError(
                f"PerceptionCache: cached features were computed for padded sizes {sorted(sizes)} "
                f"but this batch is {tuple(image_size)}; set data_preprocessor.pad_to_size so "
                "that every batch has one padded size"
            )
        pyramids = {}
        for name in self.consumers:
            maps = []
            for level in range(len(items[0][name])):
                crops = [item[name][level] for item in items]
                rows, cols = items[0][f"{name}/shapes"][level]
                maps.append(
                    torch.stack(
                        [
                            F.pad(c.float(), (0, cols - c.shape[-1], 0, rows - c.shape[-2]))
                            for c in crops
                        ]
                    )
                )
            pyramids[name] = FeaturePyramid.from_maps(
                maps, image_size=image_size, valid_sizes=valid_sizes
            )
        return pyramids, _stack_proposals(items, valid_sizes.device)


def _cells(extent: int, stride: float, limit: int) -> int:
    return min(limit, max(1, math.ceil(extent / stride)))


def _stack_proposals(items: list[dict[str, Any]], device: torch.device) -> Proposals:
    num = max([len(item["scores"]) for item in items] + [1])
    b = len(items)
    boxes = torch.zeros(b, num, 4, device=device)
    scores = torch.zeros(b, num, device=device)
    valid = torch.zeros(b, num, dtype=torch.bool, device=device)
    for i, item in enumerate(items):
        n = len(item["scores"])
        boxes[i, :n] = item["boxes"]
        scores[i, :n] = item["scores"]
        valid[i, :n] = True
    return Proposals(boxes=boxes, scores=scores, valid=valid)


class RecentImages:
    """Outside training: the pyramids and proposals of the most recently perceived images, found
    again by content.

    A batch row is a hit when an earlier row (this batch or an earlier one) had the same padded
    size, valid size and bit-equal normalised input (a blake2b digest of its bytes), never by
    file name. Items are kept in float32 as computed, so the outputs equal recomputing them; the
    owner must :meth:`clear` the memory whenever the perception weights may change (``GromaPX``
    clears it on ``train()``/``eval()`` and after loading a state dict).

    Args:
        max_items: Images kept, least recently used dropped first. 0 keeps none (within-batch
            duplicates are still computed once).
    """

    def __init__(self, max_items: int = 128) -> None:
        if max_items < 0:
            raise ValueError(f"RecentImages: max_items must be >= 0, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forgets every image (and resets the counters)."""
        self._items.clear()
        self.hits = self.misses = 0

    def __call__(
        self,
        inputs: Tensor,
        data_samples: list[BaseDataElement],
        valid_sizes: Tensor,
        compute: Callable[[Tensor, list[BaseDataElement], Tensor], Computed],
    ) -> Computed:
        """The batch's pyramids and proposals, computing each new distinct image once."""
        keys = [_content_key(inputs[i], valid_sizes[i]) for i in range(len(inputs))]
        fresh: dict[tuple, dict[str, Any]] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
            elif key not in fresh:
                fresh[key] = {}
                missing.append(i)
                self.misses += 1
            else:
                self.hits += 1
        if missing:
            rows = torch.tensor(missing, dtype=torch.long, device=inputs.device)
            pyramids, proposals = compute(
                inputs[rows], [data_samples[i] for i in missing], valid_sizes[rows]
            )
            for j, i in enumerate(missing):
                fresh[keys[i]] = {
                    "pyramids": {
                        name: (
                            type(pm),
                            tuple(m[j].clone() for m in pm.maps),
                            pm.strides,
                            pm.image_size,
                        )
                        for name, pm in pyramids.items()
                    },
                    "proposals": tuple(
                        None if t is None else t[j].clone()
                        for t in (
                            proposals.boxes,
                            proposals.scores,
                            proposals.valid,
                            proposals.embeddings,
                        )
                    ),
                }
        items = [fresh[k] if k in fresh else self._items[k] for k in keys]
        for key, item in fresh.items():
            if self.max_items:
                self._items[key] = item
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return _stack_items(items, valid_sizes)


def _content_key(image: Tensor, valid_size: Tensor) -> tuple:
    data = image.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16)
    size = tuple(int(v) for v in valid_size)
    return (tuple(image.shape), str(image.dtype), size, digest.digest())


def _stack_items(items: list[dict[str, Any]], valid_sizes: Tensor) -> Computed:
    pyramids = {}
    for name, (kind, maps, strides, image_size) in items[0]["pyramids"].items():
        stacked = tuple(
            torch.stack([item["pyramids"][name][1][level] for item in items])
            for level in range(len(maps))
        )
        pyramids[name] = kind(
            maps=stacked, strides=strides, image_size=image_size, valid_sizes=valid_sizes
        )
    # Proposal slots are padded to the batch's most (proposers may vary it between batches).
    num = max(len(item["proposals"][1]) for item in items)
    boxes, scores, valid, embeddings = (
        [None if t is None else _pad_rows(t, num) for t in field]
        for field in zip(*(item["proposals"] for item in items), strict=True)
    )
    proposals = Proposals(
        boxes=torch.stack(boxes),
        scores=torch.stack(scores),
        valid=torch.stack(valid),
        embeddings=None if embeddings[0] is None else torch.stack(embeddings),
    )
    return pyramids, proposals


def _pad_rows(t: Tensor, num: int) -> Tensor:
    if len(t) == num:
        return t
    return torch.cat([t, t.new_zeros((num - len(t), *t.shape[1:]))])
