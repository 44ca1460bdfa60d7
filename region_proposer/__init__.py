"""region_proposer: class-agnostic, DETR-style region proposers (``FeaturePyramid -> Proposals``).

Stands alone: it imports torch, torchvision, mmengine and timm, never ``groma_px`` or an LLM.
"""

from .structures import FeaturePyramid, Proposals

__all__ = ["FeaturePyramid", "Proposals"]
