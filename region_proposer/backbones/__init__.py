"""Image encoders -> ``FeaturePyramid``: ViT encoders, ViTDet pyramid, ``VisionBackbone``."""

from .simple_pyramid import SimpleFeaturePyramid
from .vision_backbone import BlockFusionNeck, VisionBackbone
from .vit_encoders import (
    HFDinov2Encoder,
    TimmViTEncoder,
    ViTEncoder,
    load_checkpoint_file,
    load_state_dict_checked,
)

__all__ = [
    "BlockFusionNeck",
    "HFDinov2Encoder",
    "SimpleFeaturePyramid",
    "TimmViTEncoder",
    "ViTEncoder",
    "VisionBackbone",
    "load_checkpoint_file",
    "load_state_dict_checked",
]
