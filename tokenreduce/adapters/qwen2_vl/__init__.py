"""Qwen2-VL (``model_type`` "qwen2_vl"): everything tokenreduce knows about this architecture."""

from .adapter import Qwen2VLAdapter
from .processor import ImageOnlyQwen2VLProcessor
from .spec import Qwen2VLSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = Qwen2VLSpec

__all__ = ["SPEC", "ImageOnlyQwen2VLProcessor", "Qwen2VLAdapter", "Qwen2VLSpec"]
