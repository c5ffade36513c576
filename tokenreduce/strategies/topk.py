"""``topk`` selector: keep the highest-scoring visual tokens.

Ties are broken deterministically: the lower candidate index wins (stable sort).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tokenreduce.core.types import Need, Selection, TokenView


def topk_mask(scores: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
    """``[B, N]`` bool: the ``keep[b]`` highest valid scores per row, ties to the lower index."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # [B, N]
    rank_ok = torch.arange(scores.shape[-1], device=scores.device).unsqueeze(0) < keep.unsqueeze(1)
    return torch.zeros_like(valid).scatter(1, order, rank_ok) & valid


class TopKSelector:
    """Keep the ``k`` highest-scoring visual tokens (ties: lower index first)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    needs: ClassVar[Need] = Need.NONE
    needs_scores: ClassVar[bool] = True

    def __init__(self, settings: Settings):
        self.settings = settings

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        return Selection.from_mask(topk_mask(scores, view.visual_valid, keep))
