"""``VisionBackbone``: one ViT pass -> one ``FeaturePyramid`` per consumer (proposer, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..registry import MODELS
from ..structures import FeaturePyramid
from .simple_pyramid import SimpleFeaturePyramid
from .vit_encoders import ViTEncoder

_FUSE_MODES = ("mean", "levels")


class BlockFusionNeck(nn.Module):
    """Turns the selected ViT blocks of one consumer into pyramid maps.

    Args:
        name: Consumer name, used in error messages.
        blocks: Block indices in ``[0, num_blocks)`` (already resolved by the encoder).
        in_channels: Channels of every block output.
        out_channels: Channels of every pyramid map.
        fuse: ``"mean"``: average the blocks, then one pyramid over ``scales``; ``"levels"``:
            block ``i`` becomes the level at ``scales[i]``. Defaults to ``"mean"``.
        scales: Pyramid scales, finest first. Defaults to (4.0, 2.0, 1.0, 0.5).
        norm: Pyramid norm, ``"LN"`` or ``"none"``. Defaults to ``"LN"``.
    """

    def __init__(
        self,
        *,
        name: str,
        blocks: Sequence[int],
        in_channels: int,
        out_channels: int,
        fuse: str = "mean",
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: str = "LN",
    ) -> None:
        super().__init__()
        if fuse not in _FUSE_MODES:
            raise ValueError(f"output {name!r}: fuse {fuse!r} not in {_FUSE_MODES}")
        if fuse == "levels" and len(scales) != len(blocks):
            raise ValueError(
                f"output {name!r}: fuse='levels' needs one scale per block, got "
                f"{len(scales)} scales for {len(blocks)} blocks"
            )
        self.blocks = tuple(blocks)
        self.fuse = fuse
        self.out_channels = out_channels
        self.num_levels = len(scales)
        pyramid_scales = [tuple(scales)] if fuse == "mean" else [(s,) for s in scales]
        if fuse == "levels" and any(a < b for a, b in zip(scales, scales[1:], strict=False)):
            raise ValueError(f"output {name!r}: scales {tuple(scales)} must be finest first")
        self.pyramids = nn.ModuleList(
            SimpleFeaturePyramid(
                in_channels=in_channels, out_channels=out_channels, scales=s, norm=norm
            )
            for s in pyramid_scales
        )

    def forward(self, block_maps: Mapping[int, Tensor]) -> list[Tensor]:
        """Fuses this consumer's blocks.

        Args:
            block_maps: Block index -> (B, C, h, w) patch map; holds at least ``self.blocks``.

        Returns:
            (B, out_channels, h_i, w_i) maps, finest first.
        """
        maps = [block_maps[i] for i in self.blocks]
        if self.fuse == "mean":
            return self.pyramids[0](torch.stack(maps).mean(dim=0))
        return [level for fmap, pyr in zip(maps, self.pyramids, strict=True) for level in pyr(fmap)]


@MODELS.register_module()
class VisionBackbone(nn.Module):
    """A ViT encoder plus per-consumer block selection, fusion and ViTDet pyramids.

    The encoder runs once per forward for the union of all consumers' blocks.

    Args:
        encoder: Config of a :class:`ViTEncoder` (``TimmViTEncoder``, ``HFDinov2Encoder``).
        outputs: Consumer name -> ``BlockFusionNeck`` kwargs without ``name``/``in_channels``:
            ``blocks`` (negative indices count from the end), ``out_channels``, and optionally
            ``fuse``, ``scales``, ``norm``. Groma: proposer ``blocks=(-4, -3, -2, -1),
            fuse="mean"``; region encoder ``blocks=(-3, -2, -1)``.
    """

    def __init__(self, *, encoder: dict, outputs: dict[str, dict]) -> None:
        super().__init__()
        if not outputs:
            raise ValueError("VisionBackbone needs at least one output")
        self.encoder = MODELS.build(encoder)
        if not isinstance(self.encoder, ViTEncoder):
            raise TypeError(f"VisionBackbone encoder must be a ViTEncoder, got {self.encoder!r}")
        necks = {}
        for name, cfg in outputs.items():
            cfg = dict(cfg)
            if "blocks" not in cfg:
                raise ValueError(f"output {name!r} needs blocks")
            blocks = self.encoder.resolve_blocks(cfg.pop("blocks"))
            necks[name] = BlockFusionNeck(
                name=name, blocks=blocks, in_channels=self.encoder.embed_dim, **cfg
            )
        self.necks = nn.ModuleDict(necks)
        self.blocks = sorted({i for neck in necks.values() for i in neck.blocks})
        self.encoder.freeze_blocks_after(self.blocks[-1])

    @property
    def patch_size(self) -> int:
        """Input pixels per patch side; padded image sizes must be multiples of it."""
        return self.encoder.patch_size

    @property
    def consumers(self) -> tuple[str, ...]:
        """Names of the configured outputs."""
        return tuple(self.necks.keys())

    def out_channels(self, consumer: str) -> int:
        """Channels of every map of ``consumer``'s pyramid."""
        if consumer not in self.necks:
            raise KeyError(f"no output {consumer!r}; outputs are {self.consumers}")
        return self.necks[consumer].out_channels

    def num_levels(self, consumer: str) -> int:
        """Number of maps in ``consumer``'s pyramid."""
        if consumer not in self.necks:
            raise KeyError(f"no output {consumer!r}; outputs are {self.consumers}")
        return self.necks[consumer].num_levels

    def forward(
        self, images: Tensor, valid_sizes: Tensor | None = None
    ) -> dict[str, FeaturePyramid]:
        """Encodes a padded batch once and builds every consumer's pyramid.

        Args:
            images: (B, 3, H, W) normalised, padded images; H, W multiples of ``patch_size``.
            valid_sizes: (B, 2) integer unpadded (h, w) per image, or None.

        Returns:
            Consumer name -> pyramid whose strides are ``H / H_i``.
        """
        maps = self.encoder.forward_blocks(images, self.blocks)
        block_maps = dict(zip(self.blocks, maps, strict=True))
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        return {
            name: FeaturePyramid.from_maps(
                neck(block_maps), image_size=image_size, valid_sizes=valid_sizes
            )
            for name, neck in self.necks.items()
        }
