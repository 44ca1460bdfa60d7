"""``ProposerDataPreprocessor``: uint8 images -> normalised batch padded to the patch grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.model import BaseDataPreprocessor
from mmengine.structures import BaseDataElement
from torch import Tensor

from ..registry import MODELS

_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


@MODELS.register_module()
class ProposerDataPreprocessor(BaseDataPreprocessor):
    """Moves a collated batch to the device, normalises it and pads it to the patch grid.

    Images are normalised first and then padded bottom/right with ``pad_value``, so padding is
    in normalised units: the default 0 is the mean colour, as in mmdet/detectron2. The padded
    size is the batch maximum rounded up to a multiple of ``pad_size_divisor``, and at least one
    divisor, so images smaller than a patch are padded rather than rejected.

    Args:
        mean: Per-channel RGB mean on the 0-255 scale. Defaults to ImageNet's.
        std: Per-channel RGB std on the 0-255 scale. Defaults to ImageNet's.
        pad_size_divisor: Padded H and W are multiples of it; set it to the encoder's patch
            size. Defaults to 14.
        pad_value: Value of padded pixels after normalisation. Defaults to 0.
        bgr_to_rgb: Flip the channel order of 3-channel inputs (for BGR loaders such as
            OpenCV/mmcv). Defaults to False (inputs are RGB).
        non_blocking: Non-blocking host-to-device copies. Defaults to False.
        pad_to_size: (H, W) the padded batch is at least as large as; a fixed size makes every
            image's features independent of its batch-mates (ViT attention sees the padding),
            which caching frozen features needs. Multiples of ``pad_size_divisor``. Defaults to
            None (pad to the batch maximum).
    """

    def __init__(
        self,
        *,
        mean: Sequence[float] = _IMAGENET_MEAN,
        std: Sequence[float] = _IMAGENET_STD,
        pad_size_divisor: int = 14,
        pad_value: float = 0.0,
        bgr_to_rgb: bool = False,
        non_blocking: bool = False,
        pad_to_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got {tuple(mean)} and {tuple(std)}")
        if pad_size_divisor < 1:
            raise ValueError(f"pad_size_divisor must be >= 1, got {pad_size_divisor}")
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.pad_size_divisor = pad_size_divisor
        if pad_to_size is not None and (
            len(pad_to_size) != 2 or any(int(v) % pad_size_divisor for v in pad_to_size)
        ):
            raise ValueError(
                f"pad_to_size must be (H, W), multiples of pad_size_divisor={pad_size_divisor}, "
                f"got {pad_to_size}"
            )
        self.pad_to_size = (
            None if pad_to_size is None else (int(pad_to_size[0]), int(pad_to_size[1]))
        )
        self.pad_value = pad_value
        self.bgr_to_rgb = bgr_to_rgb

    def forward(self, data: dict, training: bool = False) -> dict:
        """Preprocesses a ``pseudo_collate`` batch.

        Args:
            data: ``{"inputs": list of (C, h_i, w_i) uint8 (or 0-255 float) tensors with C in
                (1, 3), or a stacked (B, C, h, w) tensor; "data_samples": list of
                BaseDataElement or None}``.
            training: Unused; the same steps run in training and evaluation.

        Returns:
            ``{"inputs": (B, 3, H, W) float, "data_samples": the same list, each with metainfo
            ``batch_input_shape`` (H, W) and ``valid_size`` (h_i, w_i), "valid_sizes": (B, 2)
            long (h_i, w_i)}``.
        """
        data = self.cast_data(data)
        images = [self._normalise(i, image) for i, image in enumerate(_as_list(data["inputs"]))]
        inputs, sizes = self._pad(images)
        samples = data.get("data_samples")
        if samples is not None:
            _set_metainfo(samples, tuple(inputs.shape[-2:]), sizes)
        valid_sizes = sizes.to(inputs.device, non_blocking=self._non_blocking)
        return {"inputs": inputs, "data_samples": samples, "valid_sizes": valid_sizes}

    def _normalise(self, index: int, image: Tensor) -> Tensor:
        """(C, h, w) 0-255 image with C in (1, 3) -> (3, h, w) normalised float."""
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"{type(self).__name__}: image {index} has shape {tuple(image.shape)}; "
                "expected (C, h, w) with C = 3 (RGB) or 1 (grayscale)"
            )
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif self.bgr_to_rgb:
            image = image.flip(0)
        return (image.float() - self.mean) / self.std

    def _pad(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pads (3, h_i, w_i) images bottom/right into (B, 3, H, W); also returns (B, 2) sizes.

        The sizes stay on the CPU (they come from shapes), so metainfo needs no device sync.
        """
        if not images:
            raise ValueError(f"{type(self).__name__} got an empty batch")
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.long)
        divisor = self.pad_size_divisor
        # Round up, and keep at least one divisor so that images smaller than a patch still
        # give a one-patch grid (the ViT cannot embed a 0-sized grid).
        height, width = (max(-(-int(s) // divisor), 1) * divisor for s in sizes.amax(dim=0))
        if self.pad_to_size is not None:
            height, width = max(height, self.pad_to_size[0]), max(width, self.pad_to_size[1])
        batch = images[0].new_full((len(images), 3, height, width), float(self.pad_value))
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]] = image
        return batch, sizes


def _as_list(inputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    # default_collate gives one stacked tensor; pseudo_collate a list.
    if isinstance(inputs, Tensor):
        if inputs.ndim != 4:
            raise ValueError(f"stacked inputs must be (B, C, h, w), got {tuple(inputs.shape)}")
        return list(inputs.unbind(0))
    return list(inputs)


def _set_metainfo(
    samples: Sequence[BaseDataElement], batch_shape: tuple[int, int], valid_sizes: Tensor
) -> None:
    if len(samples) != len(valid_sizes):
        raise ValueError(f"{len(samples)} data samples for {len(valid_sizes)} images")
    for sample, size in zip(samples, valid_sizes.tolist(), strict=True):
        sample.set_metainfo({"batch_input_shape": batch_shape, "valid_size": tuple(size)})
