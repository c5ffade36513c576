"""LLaVA-NeXT (``model_type`` "llava_next"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaNextAdapter
from .spec import LlavaNextSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = LlavaNextSpec

__all__ = ["SPEC", "LlavaNextAdapter", "LlavaNextSpec"]
