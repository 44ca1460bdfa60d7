"""Construction-time checks shared by the frozen contract dataclasses of both packages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(
    owner: str,
    field: str,
    value: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype] | None = None,
    floating: bool = False,
    last_dim: int | None = None,
) -> Tensor:
    """Checks that ``value`` is a tensor of the given rank/dtype; errors name ``owner.field``.

    Args:
        owner: Class name used in the error message.
        field: Field name used in the error message.
        value: The value to check.
        ndim: Required number of dimensions.
        dtypes: Allowed dtypes. Defaults to any.
        floating: Require a floating-point dtype.
        last_dim: Required size of the last dimension. Defaults to any.

    Returns:
        The value, typed as a tensor.
    """
    name = f"{owner}.{field}"
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if last_dim is not None and value.shape[-1] != last_dim:
        raise ValueError(f"{name} must have last dim {last_dim}, got shape {tuple(value.shape)}")
    return value


def check_leading_dims(
    owner: str, reference: str, tensors: dict[str, Tensor | None], n: int
) -> None:
    """Checks that every non-None tensor shares the first ``n`` dims of ``tensors[reference]``.

    Also checks that all tensors live on the same device. Errors name the offending field.
    """
    ref = tensors[reference]
    assert ref is not None
    lead = tuple(ref.shape[:n])
    for field, value in tensors.items():
        if value is None:
            continue
        if tuple(value.shape[:n]) != lead:
            raise ValueError(
                f"{owner}.{field} has leading dims {tuple(value.shape[:n])}, but "
                f"{owner}.{reference} has {lead}"
            )
        if value.device != ref.device:
            raise ValueError(
                f"{owner}.{field} is on {value.device}, but {owner}.{reference} is on {ref.device}"
            )
