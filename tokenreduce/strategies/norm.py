"""``norm`` scorer: the L2 norm of each visual token's hidden state at the cut (float32).

A cheap, signal-free scorer, mainly useful as a control and to exercise score-based selectors.
"""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Scorer
from tokenreduce.core.types import Need, TokenView


class NormScorer(Scorer):
    """Score = L2 norm of the visual token's hidden state at the cut."""

    needs = Need.HIDDEN

    def score(self, view: TokenView) -> Tensor:
        return view.visual_hidden().float().norm(dim=-1)  # [B, N]

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.zero(c.name)  # element-wise only
