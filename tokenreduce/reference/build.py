"""Deprecated alias: the reference models' builders (``ArchSettings``, ``build_model``,
``make_processor``) moved to the repository's ``tools/reference/build.py`` (training code, not
installed). ``ImageOnlyQwen2_5_VLProcessor`` is still importable here, as the shipped Qwen2.5-VL
model card says; its home is :mod:`tokenreduce.adapters.qwen2_5_vl.processor`.
"""

from __future__ import annotations

import warnings

from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor

__all__ = ["ImageOnlyQwen2_5_VLProcessor"]

warnings.warn(
    "tokenreduce.reference.build is deprecated: ImageOnlyQwen2_5_VLProcessor lives in "
    "tokenreduce.adapters.qwen2_5_vl.processor; the model builders moved to tools/reference/build.py",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    raise AttributeError(
        f"tokenreduce.reference.build.{name} moved to tools/reference/build.py of the tokenreduce repository "
        "(training code, not installed; tools/reference/TRAINING.md)"
    )
