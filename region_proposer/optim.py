"""Mixed precision without a loss scaler, on any device: ``torch.autocast`` around the forward.

mmengine's ``AmpOptimWrapper`` refuses the CPU, yet CPUs with AVX-512 BF16 or AMX run bf16 matrix
products 2-3x faster than fp32. :class:`AutocastOptimWrapper` is the plain ``OptimWrapper`` with
the forward (``optim_context``: data preprocessor and loss) under ``torch.autocast``. Weights,
gradients and the optimizer state stay fp32; the ops autocast lists (linear, matmul, convolution,
...) run in bfloat16. bfloat16 has float32's exponent range, so no loss scaling is needed.
``region_proposer.runtime.optim_wrapper_for_device`` picks it for ``AmpOptimWrapper(dtype=
"bfloat16")`` configs on such CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from .registry import OPTIM_WRAPPERS

__all__ = ["AutocastOptimWrapper", "cpu_has_fast_bf16"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX).

    oneDNN also runs bf16 on plain AVX-512 by emulation, which is slower than fp32 there.
    """
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under ``torch.autocast(device_type, bfloat16)``.

    Args:
        *args: ``OptimWrapper``'s (``optimizer``, ``accumulative_counts``, ``clip_grad``).
        dtype: The autocast dtype; only ``"bfloat16"`` (float16 needs loss scaling: use
            mmengine's ``AmpOptimWrapper`` on CUDA).
        device_type: The autocast device type (``"cpu"``, ``"cuda"``); None takes the device
            of the model's first parameter at each forward.
        **kwargs: ``OptimWrapper``'s.

    Raises:
        ValueError: If ``dtype`` is not bfloat16.
    """

    def __init__(
        self, *args, dtype: str | torch.dtype = "bfloat16", device_type: str | None = None, **kwargs
    ) -> None:
        if dtype not in ("bfloat16", torch.bfloat16):
            raise ValueError(
                f"AutocastOptimWrapper: dtype={dtype!r}; only 'bfloat16' runs without loss "
                "scaling (float16 on CUDA: type='AmpOptimWrapper')"
            )
        super().__init__(*args, **kwargs)
        self.cast_dtype = torch.bfloat16
        self.device_type = device_type

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """``OptimWrapper.optim_context`` (gradient accumulation) inside ``torch.autocast``."""
        device_type = self.device_type
        if device_type is None:
            first = next(model.parameters(), None)
            device_type = "cpu" if first is None else first.device.type
        with super().optim_context(model), torch.autocast(device_type, dtype=self.cast_dtype):
            yield
