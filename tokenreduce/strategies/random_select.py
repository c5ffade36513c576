"""``random`` selector: a seeded uniformly random subset of the visual tokens.

Each sample draws from its own generator seeded with ``seed``, so a sample's selection does not
depend on the rest of the batch (a batch equals its single-sample runs).  The stage index is
mixed into the seed so that the stages of one plan draw independently.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tokenreduce.core.types import Need, Selection, TokenView


class RandomSelector:
    """A seeded random subset of the visual tokens (a control baseline)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = 0

    needs: ClassVar[Need] = Need.NONE
    needs_scores: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        rows = []
        for n, k in zip(view.n_visual.tolist(), keep.tolist()):
            gen = torch.Generator().manual_seed(self.settings.seed * 1000003 + view.stage)
            rows.append(torch.randperm(n, generator=gen)[:k])
        return Selection.from_lists(rows, device=view.hidden.device)
