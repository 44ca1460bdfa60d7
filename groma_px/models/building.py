"""How ``GromaPX`` derives its parts' configs (consumers, the LLM's grounding-token block,
widths and levels), builds the heads beside the LLM's and freezes what does not train."""

from __future__ import annotations

from typing import Self

from torch import nn

from region_proposer.pretrain import with_in_channels

from ..llm.copy_head import CopyHead
from ..llm.describe_head import DescribeHead
from ..llm.pointer import RegionPointerHead
from ..registry import MODELS
from .perception_cache import PerceptionCache
from .region_text import RegionTextAlignment

#: Roles that read a backbone output (``GromaPX(consumers=...)``).
CONSUMER_ROLES = ("proposer", "region", "image", "mask")


class PartsConfigMixin:
    """Config derivation, the text heads, freezing and the perception cache of ``GromaPX``
    (needs ``token_ids``, ``backbone``, ``llm``, ``consumers``, ``frozen``)."""

    def _check_consumers(self, consumers: dict[str, str] | None) -> dict[str, str]:
        out = {role: "proposer" for role in CONSUMER_ROLES}
        unknown = set(consumers or {}) - set(CONSUMER_ROLES)
        if unknown:
            raise KeyError(f"unknown consumers roles {sorted(unknown)}; known: {CONSUMER_ROLES}")
        out.update(consumers or {})
        return out

    def _llm_cfg(self, llm: dict) -> dict:
        ids = sorted(self.token_ids.all_ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("the tokenizer's grounding tokens must have contiguous ids")
        cfg = dict(llm, first_new_id=ids[0], num_new_tokens=len(ids))
        if cfg.get("config") is not None:
            cfg["config"] = dict(cfg["config"])
            cfg["config"].setdefault("vocab_size", ids[0])
        return cfg

    def _width_cfg(self, cfg: dict, role: str, *, levels: bool = False) -> dict:
        consumer = self.consumers[role]
        cfg = dict(cfg, out_dim=self.llm.hidden_size)
        cfg.setdefault("in_channels", self.backbone.out_channels(consumer))
        if levels:
            cfg.setdefault("num_levels", self.backbone.num_levels(consumer))
        return cfg

    def _build_region_classifier(self, cfg: dict | None) -> None:
        """Stage 1's ``RegionClassifier`` on the proposer's pyramid and a zero-initialised
        projection of its class probabilities to the region-token width (or None)."""
        self.region_classifier = self.class_embed = None
        if cfg is None:
            return
        cfg = {"type": "region_proposer.RegionClassifier", **cfg}
        self.region_classifier = MODELS.build(
            with_in_channels(cfg, self.backbone, self.consumers["proposer"])
        )
        num_classes = self.region_classifier.num_classes
        self.class_embed = nn.Linear(num_classes, self.llm.hidden_size, bias=False)
        nn.init.zeros_(self.class_embed.weight)

    def _mask_head_cfg(self, cfg: dict) -> dict:
        consumer = self.consumers["mask"]
        cfg = dict(cfg, region_dim=self.llm.hidden_size)
        cfg.setdefault("in_channels", self.backbone.out_channels(consumer))
        cfg.setdefault("num_levels", self.backbone.num_levels(consumer))
        return cfg

    def _build_text_heads(
        self,
        region_pointer: dict | None,
        copy_head: dict | None,
        describe_head: dict | None,
        region_text_loss: dict | None,
    ) -> None:
        """The heads beside the LLM's (``region_pointer``, ``copy_head``, ``describe_head``) and
        the region-text alignment rule (``region_text``); needs ``region_head`` set."""
        hidden = self.llm.hidden_size
        if self.region_head == "pointer":
            self.region_pointer = RegionPointerHead(hidden, **(region_pointer or {}))
        phrase_query = (
            self.region_head == "pointer" and self.region_pointer.phrase_query is not None
        )
        for name, value in (
            ("describe_head", describe_head),
            ("region_text_loss", region_text_loss),
        ):
            if value is not None and not phrase_query:
                raise ValueError(
                    f"{name} uses the pointer's phrase query: it needs region_head='pointer' and "
                    "region_pointer=dict(phrase_query=True)"
                )
        self.copy_head = None if copy_head is None else CopyHead(hidden, **copy_head)
        self.region_text = (
            None if region_text_loss is None else RegionTextAlignment(**region_text_loss)
        )
        self.describe_head = None
        if describe_head is not None:
            dim = self.region_pointer.query.out_features
            self.describe_head = DescribeHead(hidden, dim, **describe_head)

    def _build_cache(self) -> PerceptionCache:
        if not {"backbone", "proposer"} <= set(self.frozen):
            raise ValueError(
                "cache_perception=True needs 'backbone' and 'proposer' in frozen (cached "
                f"features of trained modules would go stale); frozen={self.frozen}"
            )
        return PerceptionCache([self.consumers[role] for role in ("region", "image", "mask")])

    def _freeze(self) -> None:
        for name in self.frozen:
            module = self.get_submodule(name)
            for param in module.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> Self:
        """Frozen sub-modules stay in eval mode (no dropout, fixed norms, inference proposer).
        Forgets the recently perceived images: weights may change before the next evaluation."""
        super().train(mode)
        if getattr(self, "_recent", None) is not None:
            self._recent.clear()
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self
