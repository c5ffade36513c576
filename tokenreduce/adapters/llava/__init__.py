"""LLaVA-1.5 (``model_type`` "llava"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaAdapter

__all__ = ["LlavaAdapter"]
