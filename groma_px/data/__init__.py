"""Data: the unified record format, its validator, datasets and the synthetic scenes.

Conversation templates and chat transforms live in ``templates`` / ``chat_transforms`` (imported
by the registry on demand: they depend on ``groma_px.llm``, which depends on ``schema``).
"""

from .grounded_dataset import GroundedConversationDataset
from .validate import RecordError, RecordFieldError, RecordValidator

__all__ = ["GroundedConversationDataset", "RecordError", "RecordFieldError", "RecordValidator"]
