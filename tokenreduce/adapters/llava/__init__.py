"""LLaVA-1.5 (``model_type`` "llava"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaAdapter
from .spec import LlavaSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = LlavaSpec

__all__ = ["SPEC", "LlavaAdapter", "LlavaSpec"]
