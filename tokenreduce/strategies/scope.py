"""``scope`` selector: greedy coverage gain x CLS attention (SCOPE).

Paper: "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs"
(NeurIPS 2025), arXiv 2510.24214.  Official code: ``kinredon/SCOPE``
(``scope/clip_encoder.py``, function ``SCOPE``); read for understanding only, nothing copied.

Encoder side (a stage at layer 0): each step picks the token whose coverage gain over the vision
features, times its saliency to the power ``alpha``, is largest.  Details and deviations:
``docs/strategies/scope.md``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .visionzip import check_encoder_stage


def scope_greedy(features: Tensor, saliency: Tensor, k: int, alpha: float = 1.0) -> Tensor:
    """One sample's SCOPE selection: ``[k]`` candidate indices in pick order.

    Args:
        features: ``[N, d]`` vision features (similarities computed in float64).
        saliency: ``[N]`` non-negative scores (CLS attention).
        k: tokens to pick (``<= N``).
        alpha: exponent on the saliency.
    """
    x = features.double()  # float64: the greedy compares sums of N terms, near-ties are common
    normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = normed @ normed.T  # [N, N], sim[j, i]
    n = sim.shape[0]
    weight = saliency.double().clamp(min=0) ** alpha
    cur_max = torch.zeros(n, dtype=sim.dtype, device=sim.device)
    selected = torch.zeros(n, dtype=torch.bool, device=sim.device)
    picks = torch.empty(k, dtype=torch.long, device=sim.device)
    for step in range(k):
        gain = (sim - cur_max.unsqueeze(1)).clamp(min=0).sum(0)  # [N]: sum over j
        combined = (gain * weight).masked_fill(selected, float("-inf"))
        best = int(torch.argmax(combined))  # first maximum = lower index
        picks[step] = best
        selected[best] = True
        cur_max = torch.maximum(cur_max, sim[:, best])
    return picks


class SCOPESelector(Selector):
    """Saliency x coverage greedy selection on vision features (SCOPE, arXiv 2510.24214)."""

    alpha: float = Field(default=1.0, ge=0.0, description="exponent on the saliency (CLS attention)")

    needs = Need.VISION_FEATURES
    needs_scores = True

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("scope", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return ()

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        features = view.signals.vision_features()  # [B, N, d_v]
        rows = []
        for b in range(view.batch_size):
            n = int(view.visual_valid[b].sum())
            k = int(keep[b])
            rows.append(scope_greedy(features[b, :n], scores[b, :n], k, self.alpha) if k else [])
        return Selection.from_lists(rows, device=keep.device)
