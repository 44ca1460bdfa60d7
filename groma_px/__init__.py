"""groma_px: grounded multimodal LLMs with decoupled perception (region tokens as hyperlinks)."""

from .structures import GroundedRegion, GroundedResponse, GroundedSpan, RegionSource, RegionTokens

__version__ = "0.1.0"

__all__ = [
    "GroundedRegion",
    "GroundedResponse",
    "GroundedSpan",
    "RegionSource",
    "RegionTokens",
    "__version__",
]
