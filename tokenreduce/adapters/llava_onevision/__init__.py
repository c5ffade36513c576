"""LLaVA-OneVision (``model_type`` "llava_onevision"): everything tokenreduce knows about this architecture."""

from .adapter import LlavaOnevisionAdapter
from .spec import LlavaOnevisionSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = LlavaOnevisionSpec

__all__ = ["SPEC", "LlavaOnevisionAdapter", "LlavaOnevisionSpec"]
