"""``holov`` selector: the budget split over spatial crops by crop importance, then selection
within each crop (HoloV).

Paper: "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context
Retention" (HoloV, NeurIPS 2025), arXiv 2510.02912.  The official code was **not available** to
this project; this is our reading of the paper's description, documented with its uncertain
points in ``docs/strategies/holov.md``.

Encoder side (a stage at layer 0): each token scores its saliency times its diversity within
its crop; the budget goes to the crops in proportion to their summed scores (water-filling),
then each crop keeps its best tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .pio_ve import window_ids
from .visionzip import check_encoder_stage


def allocate(weights: Tensor, sizes: Tensor, k: int) -> Tensor:
    """``[R]`` long: ``k`` tokens split over regions in proportion to ``weights`` (``[R]`` >= 0),
    at most ``sizes[r]`` each (``sum(sizes) >= k``).

    Water-filling: each round gives every open region (one with room) ``floor(share)`` of what
    is left, capped at its room, where ``share`` is proportional to its weight among the open
    regions (uniform when they all weigh 0); a round that places nothing gives one token to
    each open region in order of the largest fractional share (ties: lower region) until done.
    """
    w = weights.double().clamp(min=0)
    alloc = torch.zeros_like(sizes)
    remaining = k
    while remaining > 0:
        room = sizes - alloc
        open_ = room > 0
        if not bool(open_.any()):
            raise ValueError(f"cannot place {k} tokens in regions of sizes {sizes.tolist()}")
        share = w * open_
        if float(share.sum()) <= 0:
            share = open_.double()
        ideal = share / share.sum() * remaining
        add = torch.minimum(torch.floor(ideal).long(), room)
        if int(add.sum()) == 0:
            order = torch.sort(ideal - torch.floor(ideal), descending=True, stable=True).indices.tolist()
            for r in order:
                if remaining > int(add.sum()) and open_[r]:
                    add[r] += 1
        alloc = alloc + add
        remaining -= int(add.sum())
    return alloc


def holov_scores(features: Tensor, saliency: Tensor, region: Tensor) -> Tensor:
    """``[N]`` float32 token scores ``a_i * max(0, 1 - mean cos to the rest of its region)``."""
    x = features.float()
    normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = normed @ normed.T  # [N, N]
    same = region.unsqueeze(0) == region.unsqueeze(1)  # [N, N]
    others = same.sum(-1) - 1  # [N]
    total = (sim * same).sum(-1) - sim.diagonal()
    mean = torch.where(others > 0, total / others.clamp(min=1), torch.zeros_like(total))
    return saliency.float() * (1 - mean).clamp(min=0)


def holov_pick(features: Tensor, saliency: Tensor, region: Tensor, k: int, temperature: float) -> Tensor:
    """One sample's HoloV selection: ``[N]`` bool with exactly ``k`` True."""
    n = features.shape[0]
    scores = holov_scores(features, saliency, region)
    ids, region_index = torch.unique(region, return_inverse=True)  # regions 0..R-1
    r = ids.numel()
    importance = torch.zeros(r, dtype=torch.float64, device=scores.device).index_add_(0, region_index, scores.double())
    sizes = torch.bincount(region_index, minlength=r)
    budget = allocate(importance ** (1.0 / temperature), sizes, k)
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for c in range(r):
        if budget[c] == 0:
            continue
        members = torch.nonzero(region_index == c).flatten()
        order = torch.sort(scores[members], descending=True, stable=True).indices[: int(budget[c])]
        chosen[members[order]] = True
    return chosen


class HoloVSelector(Selector):
    """Crop-wise budget allocation + within-crop selection (HoloV, arXiv 2510.02912; derived from the paper)."""

    crops: int = Field(default=4, ge=1, description="crops per grid side (4: 16 crops of 6x6 on 24x24)")
    temperature: float = Field(default=1.0, gt=0.0, description="sharpness of the crop allocation")

    needs = Need.VISION_FEATURES | Need.VISUAL_GRID
    needs_scores = True

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("holov", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return ()

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        features = view.signals.vision_features()  # [B, N, d_v]
        grid = view.signals.visual_grid()  # [B, N, 3]
        mask = torch.zeros_like(view.visual_valid)
        for b in range(view.batch_size):
            n = int(view.visual_valid[b].sum())
            k = int(keep[b])
            if n == 0 or k == 0:
                continue
            region = window_ids(grid[b, :n], self.crops)
            mask[b, :n] = holov_pick(features[b, :n], scores[b, :n], region, k, self.temperature)
        return Selection.from_mask(mask)
