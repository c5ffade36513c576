"""Deprecated location (one release): the image-only Qwen2.5-VL processor now lives in
:mod:`tokenreduce.adapters.qwen2_5_vl.processor`, beside the rest of that architecture."""

from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor

__all__ = ["ImageOnlyQwen2_5_VLProcessor"]
