"""``uniform`` selector: visual tokens evenly spaced over each image's grid.

For each sample the keep count is split over its images in proportion to their candidates
(largest remainder).  Within an image of R x C grid cells, ``k`` target points are laid on an
``r x c`` lattice with ``r ~ sqrt(k R / C)``, ``c = ceil(k / r)`` (evenly thinned when
``r c > k``), and each target takes the nearest candidate not yet taken (ties: lower index).  On
a full grid whose sides the lattice divides this is the exact sub-lattice (e.g. every second row
and column for 1/4); after earlier stages it spreads the survivors evenly over what is left.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView


def split_budget(counts: list[int], k: int) -> list[int]:
    """Split ``k`` over groups proportionally to ``counts`` (largest remainder, capped at counts)."""
    total = sum(counts)
    k = min(k, total)
    if total == 0:
        return [0] * len(counts)
    quotas = [k * c / total for c in counts]
    out = [min(c, math.floor(q)) for c, q in zip(counts, quotas)]
    order = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while sum(out) < k:
        for i in order:
            if sum(out) < k and out[i] < counts[i]:
                out[i] += 1
    return out


def lattice_pick(rows: Tensor, cols: Tensor, k: int) -> list[int]:
    """Indices of ``k`` candidates (coordinates ``rows``/``cols``, ``[n]``) spread over their grid."""
    n = rows.numel()
    if k >= n:
        return list(range(n))
    height = float(rows.max() + 1)
    width = float(cols.max() + 1)
    r = max(1, min(k, round(math.sqrt(k * height / width))))
    c = math.ceil(k / r)
    points = [((i + 0.5) * height / r, (j + 0.5) * width / c) for i in range(r) for j in range(c)]
    if len(points) > k:  # thin evenly
        points = [points[math.floor((t + 0.5) * len(points) / k)] for t in range(k)]
    coords = torch.stack([rows.double() + 0.5, cols.double() + 0.5], dim=-1)  # cell centres
    taken = torch.zeros(n, dtype=torch.bool)
    chosen = []
    for y, x in points:
        dist = (coords[:, 0] - y) ** 2 + (coords[:, 1] - x) ** 2
        dist[taken] = float("inf")
        best = int(torch.argmin(dist))  # first minimum: lower index wins ties
        taken[best] = True
        chosen.append(best)
    return chosen


class UniformSelector(Selector):
    """Evenly spaced visual tokens over each image's grid (a spatial-coverage baseline)."""

    needs = Need.VISUAL_GRID

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.zero(c.name)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        grid = view.signals.visual_grid().cpu()  # [B, N, 3]
        rows_out = []
        for b, (n, k) in enumerate(zip(view.n_visual.tolist(), keep.tolist())):
            g = grid[b, :n]
            images = sorted(set(g[:, 0].tolist()))
            members = [torch.nonzero(g[:, 0] == img).flatten() for img in images]
            share = split_budget([len(m) for m in members], k)
            picked = []
            for idx, kk in zip(members, share):
                if kk:
                    picked += idx[lattice_pick(g[idx, 1], g[idx, 2], kk)].tolist()
            rows_out.append(picked)
        return Selection.from_lists(rows_out, device=view.hidden.device)
