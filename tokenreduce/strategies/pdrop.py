"""``pdrop`` scorer: attention from the last instruction token at a stage boundary (PyramidDrop).

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (PDrop, CVPR 2025), arXiv 2410.17247.  Official code:
``Cooperx521/PyramidDrop`` (``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``,
``pdrop_rank_drop``; read for understanding only, nothing copied).

FastV's scorer (:class:`~.fastv.FastVScorer`, one implementation) with PDrop's default
``layer_offset=0``: the official code ranks with the projections of the first layer of the next
stage, i.e. the cut layer K.  Defaults, the stage schedule and the deviations from the official
code: ``docs/strategies/pdrop.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .fastv import FastVScorer


class PDropScorer(FastVScorer):
    """Head-averaged attention from the last instruction token at the stage boundary (PDrop, arXiv
    2410.17247): FastV's scorer with PDrop's default ``layer_offset=0``."""

    layer_offset: Literal[0, -1] = Field(
        0,
        description="0: the cut layer K's projections on its input (official PDrop); -1: layer K-1 (FastV's choice)",
    )
