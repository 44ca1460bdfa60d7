"""Data: the unified record format, its validator, datasets and the synthetic scenes."""

from .grounded_dataset import GroundedConversationDataset
from .validate import RecordError, RecordFieldError, RecordValidator

__all__ = ["GroundedConversationDataset", "RecordError", "RecordFieldError", "RecordValidator"]
