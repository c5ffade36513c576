"""``random`` selector: a seeded uniformly random subset of the visual tokens.

Each sample draws from its own generator seeded with ``seed``, so a sample's selection does not
depend on the rest of the batch (a batch equals its single-sample runs).  The stage index is
mixed into the seed so that the stages of one plan draw independently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Selection, TokenView


class RandomSelector(Selector):
    """A seeded random subset of the visual tokens (a control baseline)."""

    seed: int = 0

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        rows = []
        for n, k in zip(view.n_visual.tolist(), keep.tolist()):
            gen = torch.Generator().manual_seed(self.seed * 1000003 + view.stage)
            rows.append(torch.randperm(n, generator=gen)[:k])
        return Selection.from_lists(rows, device=view.hidden.device)

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.zero(c.name)
