"""ViTDet's simple feature pyramid: one single-scale ViT map -> maps at several scales.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet), Sec. 3.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..registry import MODELS

_SCALES = (4.0, 2.0, 1.0, 0.5)
_NORMS = ("LN", "none")


def _norm(norm: str, channels: int) -> nn.Module:
    # Channel-wise LayerNorm over NCHW maps, as in ViTDet.
    return LayerNorm2d(channels) if norm == "LN" else nn.Identity()


def _resampler(scale: float, channels: int, norm: str) -> tuple[nn.Module, int]:
    """Returns the module that rescales a (B, C, h, w) map by ``scale`` and its output channels."""
    if scale == 4.0:
        layers = [
            nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
            _norm(norm, channels // 2),
            nn.GELU(),
            nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2),
        ]
        return nn.Sequential(*layers), channels // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    # ceil_mode keeps the last row/column of an odd-sized map: ceil(h / 2) cells.
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True), channels


@MODELS.register_module()
class SimpleFeaturePyramid(nn.Module):
    """Rescales one feature map to several scales, each projected to ``out_channels``.

    Per scale: 4.0 -> two stride-2 transposed convs (norm + GELU between), 2.0 -> one, 1.0 ->
    identity, 0.5 -> 2x2 max-pool; then 1x1 conv + norm + 3x3 conv + norm (ViTDet).

    Args:
        in_channels: Channels C of the input map; a multiple of 4 when scale 4.0 is used.
        out_channels: Channels of every output map.
        scales: Output scales relative to the input, finest first (non-increasing), each in
            (4.0, 2.0, 1.0, 0.5). Defaults to (4.0, 2.0, 1.0, 0.5).
        norm: ``"LN"`` (channel-wise LayerNorm) or ``"none"``. Defaults to ``"LN"``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        scales: Sequence[float] = _SCALES,
        norm: str = "LN",
    ) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        _check_args(in_channels, scales, norm)
        self.scales = scales
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for scale in scales:
            resample, channels = _resampler(scale, in_channels, norm)
            use_bias = norm == "none"
            self.stages.append(
                nn.Sequential(
                    resample,
                    nn.Conv2d(channels, out_channels, kernel_size=1, bias=use_bias),
                    _norm(norm, out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=use_bias),
                    _norm(norm, out_channels),
                )
            )

    def forward(self, features: Tensor) -> list[Tensor]:
        """Builds the pyramid.

        Args:
            features: (B, C, h, w) single-scale map.

        Returns:
            One (B, out_channels, h_i, w_i) map per scale, finest first, with
            ``h_i = h * s`` for s >= 1 and ``ceil(h / 2)`` for s = 0.5.
        """
        return [stage(features) for stage in self.stages]


def _check_args(in_channels: int, scales: tuple[float, ...], norm: str) -> None:
    if not scales:
        raise ValueError("SimpleFeaturePyramid needs at least one scale")
    unknown = [s for s in scales if s not in _SCALES]
    if unknown:
        raise ValueError(f"SimpleFeaturePyramid: scales {unknown} not in {_SCALES}")
    if any(a < b for a, b in zip(scales, scales[1:], strict=False)):
        raise ValueError(f"SimpleFeaturePyramid: scales {scales} must be finest first")
    if norm not in _NORMS:
        raise ValueError(f"SimpleFeaturePyramid: norm {norm!r} not in {_NORMS}")
    if 4.0 in scales and in_channels % 4:
        raise ValueError(
            f"SimpleFeaturePyramid: scale 4.0 needs in_channels % 4 == 0, got {in_channels}"
        )
    if 2.0 in scales and in_channels % 2:
        raise ValueError(
            f"SimpleFeaturePyramid: scale 2.0 needs in_channels % 2 == 0, got {in_channels}"
        )
