"""Qwen3-VL (``model_type`` "qwen3_vl"): everything tokenreduce knows about this architecture."""

from .adapter import Qwen3VLAdapter
from .processor import ImageOnlyQwen3VLProcessor
from .spec import Qwen3VLSpec

#: registered by tokenreduce.adapters (every folder exporting SPEC is an architecture)
SPEC = Qwen3VLSpec

__all__ = [
    "SPEC",
    "ImageOnlyQwen3VLProcessor",
    "Qwen3VLAdapter",
    "Qwen3VLSpec",
]
