"""``topk`` selector: keep the highest-scoring visual tokens.

Ties are broken deterministically: the lower candidate index wins (stable sort).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Selection, TokenView


def topk_mask(scores: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
    """``[B, N]`` bool: the ``keep[b]`` highest valid scores per row, ties to the lower index."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # [B, N]
    rank_ok = torch.arange(scores.shape[-1], device=scores.device).unsqueeze(0) < keep.unsqueeze(1)
    return torch.zeros_like(valid).scatter(1, order, rank_ok) & valid


class TopKSelector(Selector):
    """Keep the ``k`` highest-scoring visual tokens (ties: lower index first)."""

    needs_scores = True

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        return Selection.from_mask(topk_mask(scores, view.visual_valid, keep))

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.zero(c.name)
