"""LLaVA-1.5 (``model_type`` "llava"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaAdapter
from .spec import LlavaSpec

__all__ = ["LlavaAdapter", "LlavaSpec"]
