"""Mask heads: pixels for the regions an answer cites, from the shared feature pyramid."""

from .losses import mask_losses, point_sample, sample_points
from .query_head import LLMMaskHead, QueryMaskHead, TwoWayBlock

__all__ = [
    "LLMMaskHead",
    "QueryMaskHead",
    "TwoWayBlock",
    "mask_losses",
    "point_sample",
    "sample_points",
]
