"""Qwen2.5-VL (``model_type`` "qwen2_5_vl"): everything tokenreduce knows about this architecture."""

from .adapter import Qwen2_5_VLAdapter
from .processor import ImageOnlyQwen2_5_VLProcessor
from .spec import Qwen2_5_VLSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = Qwen2_5_VLSpec

__all__ = ["SPEC", "ImageOnlyQwen2_5_VLProcessor", "Qwen2_5_VLAdapter", "Qwen2_5_VLSpec"]
