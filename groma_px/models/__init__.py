"""The composed model ``GromaPX(BaseModel)``: composition only."""

from .groma_px import GromaPX

__all__ = ["GromaPX"]
