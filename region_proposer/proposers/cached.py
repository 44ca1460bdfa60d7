"""``CachedProposer``: proposals read from a safetensors file (``tools/cache_proposals.py``).

File layout: tensors ``boxes/<sample_id>`` (N, 4) normalised xyxy, ``scores/<sample_id>`` (N,) and
optionally ``embeddings/<sample_id>`` (N, D); safetensors metadata ``config_hash`` (of the proposer
config that produced them), ``proposer`` (its type) and ``created`` (UTC, ISO 8601).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import torch
from mmengine.structures import InstanceData
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..registry import MODELS
from ..structures import FeaturePyramid, Proposals
from .base import BaseProposer

__all__ = ["CachedProposer", "config_hash", "write_proposal_cache"]

REQUIRED_METADATA = ("config_hash", "proposer", "created")


def config_hash(cfg: dict) -> str:
    """16 hex chars of the sha256 of a canonical JSON of ``cfg`` (sorted keys, tuples as lists).

    Args:
        cfg: A proposer config (plain dict or mmengine ``ConfigDict``).

    Returns:
        The hash, e.g. ``"3f0c9a5e1b7d2c44"``.
    """
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_proposal_cache(
    path: str | os.PathLike,
    items: Iterable[tuple[str, Tensor, Tensor, Tensor | None]],
    *,
    config_hash: str,
    proposer: str,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Writes proposals to a safetensors file atomically (temp file in the same folder, then
    ``os.replace``), so a crash never leaves a truncated cache under ``path``.

    Args:
        path: Output file.
        items: ``(sample_id, boxes (N, 4) normalised xyxy, scores (N,), embeddings (N, D) or
            None)`` per sample; unpadded (valid rows only).
        config_hash: :func:`config_hash` of the proposer config.
        proposer: Proposer type, e.g. ``"DeformableDETRProposer"``.
        extra_metadata: More string metadata (e.g. the checkpoint). Defaults to None.
    """
    tensors: dict[str, Tensor] = {}
    for sample_id, boxes, scores, embeddings in items:
        _check_item(sample_id, boxes, scores, embeddings, tensors)
        tensors[f"boxes/{sample_id}"] = boxes.detach().float().cpu().contiguous().clone()
        tensors[f"scores/{sample_id}"] = scores.detach().float().cpu().contiguous().clone()
        if embeddings is not None:
            tensors[f"embeddings/{sample_id}"] = embeddings.detach().cpu().contiguous().clone()
    metadata = {
        **(extra_metadata or {}),
        "config_hash": config_hash,
        "proposer": proposer,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_item(
    sample_id: str, boxes: Tensor, scores: Tensor, embeddings: Tensor | None, seen: dict
) -> None:
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError(f"sample ids must be non-empty strings, got {sample_id!r}")
    if f"boxes/{sample_id}" in seen:
        raise ValueError(f"duplicate sample id {sample_id!r}")
    num = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.shape != (num, 4) or scores.shape != (num,):
        raise ValueError(
            f"sample {sample_id!r}: need boxes (N, 4) and scores (N,), got "
            f"{tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[0] != num):
        raise ValueError(
            f"sample {sample_id!r}: embeddings must be ({num}, D), got {tuple(embeddings.shape)}"
        )


@MODELS.register_module()
class CachedProposer(BaseProposer):
    """Looks up precomputed proposals by ``instances[i].metainfo["sample_id"]``.

    Lets stage-2 training skip the proposer entirely (Groma caches its DDETR boxes the same way).
    The file is memory-mapped on first use; nothing of it enters the state dict.

    Args:
        path: A safetensors file written by :func:`write_proposal_cache`.
        expected_config_hash: If given, the file's ``config_hash`` must equal it, so a config
            change upstream cannot silently reuse stale proposals. Defaults to None.
    """

    trainable = False

    def __init__(self, *, path: str, expected_config_hash: str | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        with safe_open(self.path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            self._keys = frozenset(handle.keys())
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ValueError(
                f"{self.path} is not a proposal cache (metadata lacks {missing}); write it with "
                "tools/cache_proposals.py"
            )
        self.metadata: dict[str, str] = dict(metadata)
        if expected_config_hash is not None and metadata["config_hash"] != expected_config_hash:
            raise ValueError(
                f"proposal cache {self.path} was made with config hash "
                f"{metadata['config_hash']!r}, expected {expected_config_hash!r}; regenerate it "
                "with tools/cache_proposals.py or update expected_config_hash"
            )
        self._handle: Any = None

    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Cached proposals of each image, padded to the batch's largest count.

        Args:
            feats: Features of the batch (only its batch size and device are used).
            instances: One ``InstanceData`` per image whose metainfo has ``sample_id``.

        Returns:
            ``Proposals`` (with ``embeddings`` when the cache holds them).

        Raises:
            KeyError: if a sample id is missing from the file (names the id and the file).
        """
        if instances is None or len(instances) != feats.batch_size:
            raise ValueError(
                f"CachedProposer needs one InstanceData per image ({feats.batch_size})"
            )
        rows = [self.lookup(_sample_id(inst, i)) for i, inst in enumerate(instances)]
        return _pad(rows, device=feats.maps[0].device)

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """The cached proposals and no losses (nothing to train)."""
        return self(feats, instances), {}

    def lookup(self, sample_id: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(N, 4) boxes, (N,) scores and (N, D) embeddings or None of one sample, on the CPU."""
        if f"boxes/{sample_id}" not in self._keys:
            raise KeyError(f"sample id {sample_id!r} is not in the proposal cache {self.path}")
        if self._handle is None:
            self._handle = safe_open(self.path, framework="pt")
        embeddings_key = f"embeddings/{sample_id}"
        return (
            self._handle.get_tensor(f"boxes/{sample_id}"),
            self._handle.get_tensor(f"scores/{sample_id}"),
            self._handle.get_tensor(embeddings_key) if embeddings_key in self._keys else None,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The open file handle cannot be pickled or deep-copied (EMA, DDP); reopen lazily.
        state = dict(self.__dict__)
        state["_handle"] = None
        return state


def _sample_id(inst: InstanceData, index: int) -> str:
    sample_id = inst.metainfo.get("sample_id")
    if sample_id is None:
        raise KeyError(f"instances[{index}] has no metainfo 'sample_id' to look up a proposal")
    return str(sample_id)


def _pad(rows: list[tuple[Tensor, Tensor, Tensor | None]], *, device: torch.device) -> Proposals:
    """Stacks per-image (N_i, ...) rows into padded ``Proposals``."""
    has_embeddings = {emb is not None for _, _, emb in rows}
    if len(has_embeddings) > 1:
        raise ValueError("the batch mixes cached samples with and without embeddings")
    num = max((len(scores) for _, scores, _ in rows), default=0)
    batch = len(rows)
    boxes = torch.zeros(batch, num, 4)
    scores = torch.zeros(batch, num)
    valid = torch.zeros(batch, num, dtype=torch.bool)
    embeddings = None
    if True in has_embeddings:
        dims = {emb.shape[-1] for _, _, emb in rows if emb is not None}
        if len(dims) != 1:
            raise ValueError(f"cached embeddings have different widths {sorted(dims)}")
        embeddings = torch.zeros(batch, num, dims.pop(), dtype=rows[0][2].dtype)  # type: ignore[union-attr]
    for i, (boxes_i, scores_i, emb_i) in enumerate(rows):
        count = len(scores_i)
        boxes[i, :count], scores[i, :count], valid[i, :count] = boxes_i, scores_i, True
        if embeddings is not None and emb_i is not None:
            embeddings[i, :count] = emb_i
    return Proposals(
        boxes=boxes.to(device),
        scores=scores.to(device),
        valid=valid.to(device),
        embeddings=None if embeddings is None else embeddings.to(device),
    )
