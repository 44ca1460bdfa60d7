"""One file per proposer (``FeaturePyramid -> Proposals``), each registered in ``MODELS``."""

from .base import BaseProposer
from .cached import CachedProposer
from .deformable_detr import DeformableDETRProposer
from .detr import DETRProposer
from .ground_truth import GroundTruthProposer
from .rpn import RPNProposer

__all__ = [
    "BaseProposer",
    "CachedProposer",
    "DETRProposer",
    "DeformableDETRProposer",
    "GroundTruthProposer",
    "RPNProposer",
]
