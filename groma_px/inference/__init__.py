"""Inference API: ``GroundedChat`` and model export/loading."""

from .chat import Conversation, GroundedChat
from .export import export_pretrained, load_exported

__all__ = ["Conversation", "GroundedChat", "export_pretrained", "load_exported"]
