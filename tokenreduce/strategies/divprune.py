"""``divprune`` selector: max-min diversity subset of the visual tokens (DivPrune).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025),
arXiv 2503.02175.  Official code: ``vbdi/divprune`` (``LLaVA/llava/model/llava_arch.py``:
``DivPrune``, ``pairwise_cosine_similarity`` and the call in
``prepare_inputs_labels_for_multimodal``; read for understanding only, nothing copied).

Greedy farthest-point selection by cosine distance on the hidden states at the cut, in float32;
ties to the lower index.  Details and deviations: ``docs/strategies/divprune.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView


def max_min_diverse(features: Tensor, k: int) -> list[int]:
    """Greedy max-min diversity selection by cosine distance.

    Args:
        features: ``[n, d]`` (any float dtype; computed in float32).
        k: tokens to select (clamped to ``[0, n]``).
    Returns:
        ``k`` distinct row indices in selection order.
    """
    n = features.shape[0]
    k = min(max(int(k), 0), n)
    if k == 0:
        return []
    if k == n:
        return list(range(n))
    x = F.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T  # [n, n] cosine distance
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest_other = dist.masked_fill(eye, float("inf")).min(dim=0).values  # [n]
    first = int(torch.argmax(nearest_other))  # first maximum: the lower index wins ties
    chosen = [first]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[first] = True
    closest = dist[first].clone()  # [n] distance to the nearest selected token
    for _ in range(k - 1):
        pick = int(torch.argmax(closest.masked_fill(taken, float("-inf"))))
        chosen.append(pick)
        taken[pick] = True
        closest = torch.minimum(closest, dist[pick])
    return chosen


class DivPruneSelector(Selector):
    """Greedy max-min cosine-distance diversity subset (DivPrune, arXiv 2503.02175)."""

    needs = Need.HIDDEN
    needs_scores = False

    def cost(self, c: StageCostInput) -> Cost:
        """The ``N x N`` similarity product ``2*N^2*d``."""
        n, d = c.visual_before, c.dims.hidden
        return Cost(2 * n * n * d, float(n * n * d), f"divprune: {n}x{n} cosine similarities (X X^T)")

    @torch.no_grad()
    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` (clamped to ``[0, n_visual[b]]``) ascending candidate indices per
        sample; ``scores`` are ignored."""
        feats = view.visual_hidden()  # [B, N, d]
        rows = [max_min_diverse(feats[b, :n], k) for b, (n, k) in enumerate(zip(view.n_visual.tolist(), keep.tolist()))]
        return Selection.from_lists(rows, device=view.hidden.device)
