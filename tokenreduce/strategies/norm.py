"""``norm`` scorer: the L2 norm of each visual token's hidden state at the cut (float32).

A cheap, signal-free scorer, mainly useful as a control and to exercise score-based selectors.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tokenreduce.core.types import Need, TokenView


class NormScorer:
    """Score = L2 norm of the visual token's hidden state at the cut."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    needs: ClassVar[Need] = Need.HIDDEN

    def __init__(self, settings: Settings):
        self.settings = settings

    def score(self, view: TokenView) -> Tensor:
        return view.visual_hidden().float().norm(dim=-1)  # [B, N]
