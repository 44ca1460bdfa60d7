"""Transformer building blocks of the DETR-style proposers: multi-scale deformable attention,
encoder / decoder layers, pyramid embedding with padding masks, set-prediction outputs, and the
RoIAlign of regions on a pyramid."""

from .ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from .pyramid_input import FlatPyramid, PyramidEmbedding, check_pyramid, padding_masks
from .roi_pooling import boxes_to_pixels, pixel_stem, pool_levels
from .set_prediction import LayerPrediction, prediction_losses, proposals_from_prediction
from .transformer import (
    MLP,
    DeformableDecoderLayer,
    DeformableEncoder,
    DETRDecoderLayer,
    SinePositionEmbedding,
)

__all__ = [
    "MLP",
    "DETRDecoderLayer",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "FlatPyramid",
    "LayerPrediction",
    "MSDeformAttn",
    "PyramidEmbedding",
    "boxes_to_pixels",
    "SinePositionEmbedding",
    "check_pyramid",
    "multi_scale_deformable_attention",
    "padding_masks",
    "pixel_stem",
    "pool_levels",
    "prediction_losses",
    "proposals_from_prediction",
]
