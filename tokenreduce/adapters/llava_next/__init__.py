"""LLaVA-NeXT (``model_type`` "llava_next"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaNextAdapter
from .spec import LlavaNextSpec

__all__ = ["LlavaNextAdapter", "LlavaNextSpec"]
