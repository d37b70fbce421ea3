"""Attention backends behind one interface (see base.py)."""

from engine.attention.base import AttentionBackend, get_backend
from engine.attention.metadata import AttentionMetadata, forward_context, get_forward_context

__all__ = ["AttentionBackend", "AttentionMetadata", "forward_context", "get_backend", "get_forward_context"]
