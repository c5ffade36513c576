"""``sparsevlm`` scorer and selector: text-rater attention, then top-k with token recycling.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(ICML 2025), arXiv 2410.04417.  Official code: ``Gumpest/SparseVLMs``; the ``v1.5`` branch (the
ICML version, March 2025: ``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``,
``utils.py::cluster_and_merge``) is what this follows; the original October 2024 release (the
first commits of ``main``) was read for the adaptive rank rule (read for understanding only,
nothing copied).

The scorer averages the attention of the text "raters" (the text tokens after the image whose
relevance to the visual tokens is above the mean) to each visual token.  The selector keeps the
top tokens and recycles the best deleted ones into merged tokens (DPC-KNN clusters), each
replacing its cluster's centre; the plan's keep is the count of both.  Details, budgets and the
deviations from the official code: ``docs/strategies/sparsevlm.md``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Scorer, Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .dart import text_after_visual


# -- scorer ------------------------------------------------------------------------------------
def select_raters(view: TokenView) -> tuple[Tensor, Tensor]:
    """SparseVLM's text raters at this cut.

    Returns ``slots`` ``[B, R]`` long (ascending positions in the current sequence, padded with the
    sample's last valid slot) and ``valid`` ``[B, R]`` bool.
    """
    text_slots, text_valid = text_after_visual(view)  # [B, T]
    d = view.hidden.shape[-1]
    h_text = view.hidden.gather(1, text_slots.unsqueeze(-1).expand(-1, -1, d)).float()  # [B, T, d]
    h_vis = view.visual_hidden().float()  # [B, N, d]
    logits = h_vis @ h_text.transpose(1, 2)  # [B, N, T]
    logits = logits.masked_fill(~text_valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [B, N, T]
    vis = view.visual_valid.float().unsqueeze(-1)  # [B, N, 1]
    relevance = (probs * vis).sum(1) / vis.sum(1).clamp(min=1.0)  # [B, T]
    n_text = text_valid.sum(-1, keepdim=True)  # [B, 1]
    mean = (relevance * text_valid).sum(-1, keepdim=True) / n_text.clamp(min=1)
    raters = text_valid & (relevance > mean)  # [B, T]
    none = ~raters.any(-1, keepdim=True)
    raters = torch.where(none, text_valid, raters)  # no token above the mean: all text tokens
    no_text = n_text == 0  # no text after the image: the last valid slot (text_slots' padding)
    raters = raters | (no_text & (torch.arange(raters.shape[1], device=raters.device) == 0))
    counts = raters.sum(-1)
    r = max(int(counts.max()), 1)
    order = torch.argsort((~raters).to(torch.int8), dim=-1, stable=True)[:, :r]
    rater_slots = text_slots.gather(1, order)
    rater_valid = torch.arange(r, device=raters.device).unsqueeze(0) < counts.unsqueeze(1)
    rater_slots = torch.where(rater_valid, rater_slots, text_slots[:, -1:].expand_as(rater_slots))
    return rater_slots, rater_valid


class SparseVLMScorer(Scorer):
    """Mean attention of SparseVLM's text raters to each visual token (arXiv 2410.04417)."""

    layer_offset: Literal[0, -1] = Field(
        0,
        description="attention of the cut layer K on its input (0) or of layer K-1 (-1); the official "
        "code ranks with its pruning layer's attention and drops after that layer",
    )

    needs = Need.HIDDEN | Need.ATTENTION_ROWS

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.layer_offset == -1 and layer < 1:
            return "layer_offset=-1 reads the layer before the cut, and a cut at layer 0 has none; use layer_offset=0"
        return None

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.not_counted("rater rows and their relevance products depend on the data")

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32: head- and rater-averaged attention to each candidate (0 where invalid)."""
        slots, valid = select_raters(view)  # [B, R]
        probs = view.signals.attention_rows(slots, layer_offset=self.layer_offset)  # [B, H, R, S]
        per_rater = probs.float().mean(dim=1)  # [B, R, S]
        w = valid.float().unsqueeze(-1)
        received = (per_rater * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, S]
        return received.gather(1, view.visual_index).masked_fill(~view.visual_valid, 0.0)


def adaptive_keep(relation: Tensor, scale: float, bias: float) -> int:
    """The original release's adaptive count for one sample (reference only, unused by plans):
    ``min(int(rank(relation) * scale + bias), N - 1)``; ``relation`` ``[R, N]`` is the head-averaged
    attention of the R raters to the N visual tokens.  Its defaults were scale 13.5 / bias 0
    ("192"), 9 / 6 ("128") and 0.8 / 0 ("64")."""
    rank = int(torch.linalg.matrix_rank(relation.float()))
    return min(int(rank * scale + bias), relation.shape[-1] - 1)


# -- selector with recycling -------------------------------------------------------------------
def recycle_sizes(n: int, keep: int, ratio: float = 0.3, per_cluster: int = 10) -> tuple[int, int, int]:
    """``(top, recycled, clusters)`` for ``n`` candidates and a stage keep of ``keep``.

    ``clusters = floor(recycled / per_cluster) + 1`` with ``recycled = min(int(ratio * d) + 1, d)``
    and ``d = n - top`` deleted candidates, ``top = keep - clusters``: the least fixed point,
    iterated from ``clusters = 0`` (the map is non-decreasing and bounded, so it stops).  No
    recycling (``(keep, 0, 0)``) when ``keep >= n`` or ``keep < 2``.
    """
    if keep >= n or keep < 2:
        return min(keep, n), 0, 0
    clusters = 0
    while True:
        deleted = n - (keep - clusters)
        recycled = min(int(ratio * deleted) + 1, deleted)  # official: int(d * 0.3) + 1
        new = min(recycled // per_cluster + 1, recycled, keep - 1)
        if new <= clusters:
            return keep - clusters, recycled, clusters
        clusters = new


def dpc_knn(features: Tensor, clusters: int) -> tuple[list[int], Tensor]:
    """Density-peak clustering with k nearest neighbours (``k = clusters``), as SparseVLM uses it.

    Args:
        features: ``[r, d]`` float32.
        clusters: number of clusters, ``1 <= clusters <= r``.
    Returns:
        ``centres`` (row indices, by descending centre score) and ``assign`` ``[r]`` long: the
        cluster (index into ``centres``) of each row; a centre belongs to its own cluster.

    Distances are Euclidean divided by ``sqrt(d)``; density ``rho_i = exp(-mean of the squared
    distances to the k nearest rows, itself included)``; ``delta_i`` = distance to the nearest
    denser row (the largest distance overall for the densest); centres = the ``clusters`` largest
    ``rho * delta``; every other row joins its nearest centre.  Ties: equal densities rank by row
    order (earlier = denser), equal centre scores and equal distances go to the earlier row/centre.
    """
    r, dim = features.shape
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(dim)  # [r, r]
    knn = torch.topk(dist, k=clusters, dim=-1, largest=False).values  # [r, k]
    density = torch.exp(-(knn**2).mean(-1))  # [r]
    rows = torch.arange(r, device=features.device)
    # denser[i, j]: row j is denser than row i (ties: the earlier row)
    denser = (density.unsqueeze(0) > density.unsqueeze(1)) | (
        (density.unsqueeze(0) == density.unsqueeze(1)) & (rows.unsqueeze(0) < rows.unsqueeze(1))
    )
    delta = dist.masked_fill(~denser, float("inf")).min(-1).values  # [r]
    delta = torch.minimum(delta, dist.max())  # the densest row: the largest distance overall
    score = delta * density
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]  # [c]
    assign = dist[:, centres].argmin(-1)  # [r] first minimum: the earlier centre wins ties
    assign[centres] = torch.arange(clusters, device=features.device)
    return centres.tolist(), assign


class SparseVLMSelector(Selector):
    """Top-k by score plus SparseVLM's recycling of the best deleted tokens into merged tokens."""

    recycle: bool = Field(True, description="merge the best deleted tokens into cluster tokens (official: on)")
    recycle_ratio: float = Field(
        0.3, gt=0.0, le=1.0, description="share of the deleted tokens (by score) that are recycled"
    )
    per_cluster: int = Field(10, ge=1, description="recycled tokens per cluster: clusters = floor(recycled / this) + 1")

    needs = Need.HIDDEN
    needs_scores = True

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.not_counted("DPC-KNN clustering of the recycled tokens depends on the data")

    @torch.no_grad()
    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` ascending candidate indices per sample; ``Selection.hidden`` holds
        the merged hidden states at the anchors (the other rows unchanged), or None without
        recycling."""
        if scores is None:
            raise ValueError("the sparsevlm selector needs scores (use the sparsevlm scorer, or another one)")
        valid = view.visual_valid
        if scores.shape != valid.shape:
            raise ValueError(f"scores must be [B, N] = {tuple(valid.shape)}, got {tuple(scores.shape)}")
        key = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~valid, float("-inf"))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [B, N]
        d = view.hidden.shape[-1]
        rows, merged_rows = [], []
        for b, (n, k) in enumerate(zip(view.n_visual.tolist(), keep.tolist())):
            k = min(max(int(k), 0), n)
            top, recycled, clusters = (
                recycle_sizes(n, k, self.recycle_ratio, self.per_cluster) if self.recycle else (k, 0, 0)
            )
            ranked = order[b, :n]
            kept = ranked[:top].tolist()
            merged: dict[int, Tensor] = {}
            if clusters:
                pool = ranked[top : top + recycled]  # the best deleted candidates, by descending score
                slots = view.visual_index[b, pool]
                feats = view.hidden[b, slots].float()  # [r, d]
                centres, assign = dpc_knn(feats, clusters)
                for ci, centre in enumerate(centres):
                    members = feats[assign == ci]
                    merged[int(pool[centre])] = members.mean(0)
                kept += list(merged)
            rows.append(kept)
            merged_rows.append(merged)
        sel = Selection.from_lists(rows, device=view.hidden.device)
        if not any(merged_rows):
            return sel
        # new hidden states of the kept candidates: merged at the anchors, unchanged elsewhere
        slots = view.visual_index.gather(1, sel.index)  # [B, k]
        hidden = view.hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, d)).clone()  # [B, k, d]
        for b, merged in enumerate(merged_rows):
            for j, cand in enumerate(sel.index[b].tolist()):
                if sel.valid[b, j] and cand in merged:
                    hidden[b, j] = merged[cand].to(hidden.dtype)
        sel.hidden = hidden
        return sel
