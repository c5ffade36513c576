"""``scope`` selector: greedy coverage gain x CLS attention (SCOPE).

Paper: "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs"
(NeurIPS 2025), arXiv 2510.24214.  Official code: ``kinredon/SCOPE``
(``scope/clip_encoder.py``, function ``SCOPE``); read for understanding only, nothing copied.
Docs page: ``docs/strategies/scope.md``.

At an encoder-side stage (layer 0), per sample, with ``C`` = cosine similarity of the
candidates' vision features (CLIP layer -2 output, the projector's input; ``[N, N]``) and ``a``
= the stage's scores (by default ``vision_cls``: CLS -> patch attention at vision layer -2,
summed over heads):

* ``cur_max[j] = 0`` for every candidate ``j``;
* repeat ``k`` times: ``gain[i] = sum_j max(0, C[j, i] - cur_max[j])`` over all candidates ``j``,
  ``score[i] = gain[i] * a[i] ** alpha`` (``alpha = 1``), pick the unselected ``i`` with the
  largest score (ties: lower index), ``cur_max = max(cur_max, C[:, i])``.

Only the selected tokens are kept (no merging), in image order.

Deviations from the official code: any batch composition (the official code splits the
budget evenly over a batch of images); the exponent is a setting (official: environment
variable ``ALPHA``); the additive combination (``COMBINED=add``) is not offered; signals are
recomputed from captured CLIP layer inputs (official: eager attention maps).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

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


class SCOPESelector:
    """Saliency x coverage greedy selection on vision features (SCOPE, arXiv 2510.24214)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        alpha: float = Field(default=1.0, ge=0.0, description="exponent on the saliency (CLS attention)")

    needs: ClassVar[Need] = Need.VISION_FEATURES
    needs_scores: ClassVar[bool] = True

    def __init__(self, settings: Settings):
        self.settings = settings

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
            rows.append(scope_greedy(features[b, :n], scores[b, :n], k, self.settings.alpha) if k else [])
        return Selection.from_lists(rows, device=keep.device)
