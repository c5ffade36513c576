"""``divprune`` selector: max-min diversity subset of the visual tokens (DivPrune).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025),
arXiv 2503.02175.  Official code: ``vbdi/divprune`` (``LLaVA/llava/model/llava_arch.py``:
``DivPrune``, ``pairwise_cosine_similarity`` and the call in
``prepare_inputs_labels_for_multimodal``; read for understanding only, nothing copied).  Docs
page: ``docs/strategies/divprune.md``.

DivPrune casts pruning as a Max-Min Diversity Problem and solves it greedily (farthest-point
selection) with the cosine distance ``D(i, j) = 1 - cos(x_i, x_j)`` between visual tokens:

1. the first token is the one whose nearest *other* token is farthest away
   (``argmax_j min_{i != j} D(i, j)``);
2. each further token maximises its distance to the nearest already selected one
   (``argmax_j min_{s in selected} D(s, j)``), until ``k`` are selected.

Features: the hidden states at the cut (``view.visual_hidden()``), in float32.  The official code
runs before the LLM, on the projector outputs (the visual rows of the input embeddings), i.e. a
cut at K = 0 (stage ``layer: 0``); the selector works at any cut.  The pruned sequence is then fed
to the LLM as a shorter input, so positions are contiguous: ``positions: renumber``.  No
attention is read: any attention implementation works.

Defaults: none (a selector without settings); the paper's LLaVA-1.5 setting keeps
``round(0.098 x 576) = 56`` tokens (``SUBSET_RATIO=0.098``).

Deviations from the official code:

* the first pick excludes the diagonal explicitly (official: the second-smallest entry of each
  column, which equals it unless rounding makes a self-distance larger than a duplicate's);
* already selected tokens are excluded from later picks (official: they only score 0, so with
  exact duplicates left it can pick a token twice);
* ties go to the lower candidate index (``argmax`` on CPU does the same; CUDA does not promise it);
* distances in float32 (official: the model dtype, fp16);
* any batch size, ragged visual counts (official: batch size 1, a fixed 35-token system prompt).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor

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


class DivPruneSelector:
    """Greedy max-min cosine-distance diversity subset (DivPrune, arXiv 2503.02175)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    needs: ClassVar[Need] = Need.HIDDEN
    needs_scores: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings

    @torch.no_grad()
    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` (clamped to ``[0, n_visual[b]]``) ascending candidate indices per
        sample; ``scores`` are ignored."""
        feats = view.visual_hidden()  # [B, N, d]
        rows = [
            max_min_diverse(feats[b, :n], k)
            for b, (n, k) in enumerate(zip(view.n_visual.tolist(), keep.tolist()))
        ]
        return Selection.from_lists(rows, device=view.hidden.device)
