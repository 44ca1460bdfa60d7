"""Vision side of groma_px: image tokens for the LLM (pyramids come from region_proposer)."""

from .image_tokenizer import ImageTokenizer

__all__ = ["ImageTokenizer"]
