"""Objectness heads, one per training data source, and the config rule that fuses their scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import MODELS

__all__ = ["ObjectnessHeads"]

DEFAULT_SOURCE = "default"
FUSION_TYPES = ("geometric", "mean", "max")


@MODELS.register_module()
class ObjectnessHeads(nn.Module):
    """One linear objectness head per data source; their scores fused by a rule from the config.

    Datasets label "objects" differently (COCO: 80 categories; SA-1B: every part and stuff
    region), so Groma trains one head per source and fuses them at inference
    (``coco ** 0.4 * sa1b ** 0.6``). Here that is a preset:
    ``fusion=dict(rule="geometric", weights=dict(coco=0.4, sa1b=0.6))``.

    Args:
        in_dim: Width D of the query features.
        sources: Names of the data sources, one head each. Defaults to ``("default",)``.
        fusion: Fusion rule: None (the only head, or the ``"default"`` head),
            ``dict(rule="geometric", weights={source: w})`` (prod of sigmoid ** w over the
            weighted sources), ``dict(rule="mean")`` or ``dict(rule="max")`` (over all heads).
            Defaults to None.
        prior_prob: Initial foreground probability of every head (focal-loss prior, Lin et al.
            2017). Defaults to 0.01.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        sources: Sequence[str] = (DEFAULT_SOURCE,),
        fusion: dict | None = None,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.sources = _check_sources(sources)
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
        self.fusion = self._check_fusion(fusion)
        self.heads = nn.ModuleDict({source: nn.Linear(in_dim, 1) for source in self.sources})
        self.prior_prob = prior_prob
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default linear weights; biases at the focal prior, logit(prior_prob)."""
        bias = -math.log((1.0 - self.prior_prob) / self.prior_prob)
        for head in self.heads.values():
            head.reset_parameters()
            nn.init.constant_(head.bias, bias)

    def forward(self, hidden: Tensor) -> dict[str, Tensor]:
        """Objectness logits of every head.

        Args:
            hidden: (B, N, D) query features.

        Returns:
            Source name -> (B, N, 1) logits.
        """
        return {source: head(hidden) for source, head in self.heads.items()}

    def fuse(self, logits: dict[str, Tensor]) -> Tensor:
        """Fuses per-source logits into one score per query.

        Args:
            logits: Source name -> (B, N, 1) (or (B, N)) logits, as returned by :meth:`forward`.

        Returns:
            (B, N) scores in [0, 1].
        """
        rule = self.fusion["rule"]
        if rule == "single":
            names = [self.fusion["source"]]
        else:
            names = list(self.fusion["weights"]) if rule == "geometric" else list(self.sources)
        missing = [name for name in names if name not in logits]
        if missing:
            raise KeyError(f"fusion {rule!r} needs logits of {missing}; got {sorted(logits)}")
        flat = {name: _squeeze(logits[name], name) for name in names}
        if rule == "single":
            return flat[names[0]].sigmoid()
        if rule == "geometric":
            # prod(sigmoid(l) ** w) = exp(sum(w * log sigmoid(l))): stable for very negative logits
            log_score = sum(w * F.logsigmoid(flat[s]) for s, w in self.fusion["weights"].items())
            return torch.exp(log_score)
        probs = torch.stack([flat[name].sigmoid() for name in names], dim=0)
        return probs.mean(dim=0) if rule == "mean" else probs.amax(dim=0)

    def head_for(self, source: str | None) -> str:
        """The head that trains on images of ``source``.

        Args:
            source: Data-source name from the sample's metainfo, or None.

        Returns:
            ``source`` if it has a head, else ``"default"`` if that head exists.

        Raises:
            ValueError: if neither exists; the message names the known sources.
        """
        if source in self.heads:
            return str(source)
        if DEFAULT_SOURCE in self.heads:
            return DEFAULT_SOURCE
        raise ValueError(
            f"no objectness head for source {source!r} and no {DEFAULT_SOURCE!r} head; "
            f"known sources: {list(self.sources)}"
        )

    def select(self, logits: dict[str, Tensor], sources: Sequence[str | None]) -> Tensor:
        """Per image, the logits of the head that trains on its source (for the loss).

        Args:
            logits: Source name -> (B, N, 1) logits.
            sources: B data-source names (``instances[i].metainfo["source"]``) or None.

        Returns:
            (B, N, 1) logits; image i's come from ``head_for(sources[i])``.
        """
        names = [self.head_for(source) for source in sources]
        reference = next(iter(logits.values()))
        if len(names) != reference.shape[0]:
            raise ValueError(f"got {len(names)} sources for a batch of {reference.shape[0]}")
        return torch.stack([logits[name][i] for i, name in enumerate(names)], dim=0)

    def _check_fusion(self, fusion: dict | None) -> dict:
        if fusion is None:
            if len(self.sources) == 1:
                return {"rule": "single", "source": self.sources[0]}
            if DEFAULT_SOURCE in self.sources:
                return {"rule": "single", "source": DEFAULT_SOURCE}
            raise ValueError(
                f"sources {list(self.sources)} need a fusion rule (no {DEFAULT_SOURCE!r} head); "
                f"set fusion=dict(rule=...) with rule in {FUSION_TYPES}"
            )
        fusion = dict(fusion)
        rule = fusion.pop("rule", None)
        if rule not in FUSION_TYPES:
            raise ValueError(f"fusion rule must be one of {FUSION_TYPES}, got {rule!r}")
        weights = fusion.pop("weights", None)
        if fusion:
            raise ValueError(f"unknown fusion keys {sorted(fusion)} for rule {rule!r}")
        if rule != "geometric":
            if weights is not None:
                raise ValueError(f"fusion rule {rule!r} takes no weights")
            return {"rule": rule}
        return {"rule": rule, "weights": self._check_weights(weights)}

    def _check_weights(self, weights: dict | None) -> dict[str, float]:
        if not weights:
            raise ValueError("geometric fusion needs weights={source: exponent}")
        unknown = [name for name in weights if name not in self.sources]
        if unknown:
            raise ValueError(
                f"fusion weights name unknown sources {unknown}; "
                f"known sources: {list(self.sources)}"
            )
        if any(float(w) < 0 for w in weights.values()) or not any(
            float(w) > 0 for w in weights.values()
        ):
            raise ValueError(f"fusion weights must be >= 0 with one > 0, got {dict(weights)}")
        return {name: float(w) for name, w in weights.items()}


def _check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sources, str):
        raise TypeError(f"sources must be a sequence of names, got the string {sources!r}")
    names = tuple(sources)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sources must be non-empty and unique, got {list(names)}")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"source names must be non-empty strings without '.', got {name!r}")
    return names


def _squeeze(logits: Tensor, name: str) -> Tensor:
    if logits.ndim == 3 and logits.shape[-1] == 1:
        return logits[..., 0]
    if logits.ndim == 2:
        return logits
    raise ValueError(f"logits[{name!r}] must be (B, N, 1) or (B, N), got {tuple(logits.shape)}")
