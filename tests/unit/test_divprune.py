"""The ``divprune`` selector (DivPrune, arXiv 2503.02175) against a slow max-min reference."""

from __future__ import annotations

import math

import pytest
import torch
from strategies.baseline_fixtures import Layout, make_view, split_view

from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.divprune import DivPruneSelector, max_min_diverse

SELECTOR = DivPruneSelector(DivPruneSelector.Settings())


def reference_divprune(features: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity with the cosine distance, float64 python loops: first the token
    whose nearest other token is farthest, then repeatedly the token farthest from its nearest
    selected one; ties to the lower index; a selected token is never picked again."""
    rows = [[float(v) for v in r] for r in features.double()]
    n = len(rows)
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]

    def dist(i: int, j: int) -> float:
        return 1.0 - sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])

    k = min(max(k, 0), n)
    if k == 0:
        return []
    if k == n:
        return list(range(n))
    nearest = [min(dist(i, j) for i in range(n) if i != j) for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(chosen) < k:
        best, best_val = None, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            val = min(dist(s, j) for s in chosen)
            if val > best_val:
                best, best_val = j, val
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("k", [1, 2, 5, 13, 29, 30])
def test_equals_reference_in_selection_order(k):
    feats = torch.randn(30, 12, generator=torch.Generator().manual_seed(k))
    assert max_min_diverse(feats, k) == reference_divprune(feats, k)


def test_ragged_batch_equals_reference_and_single_runs():
    layouts = [Layout(3, 20, 4), Layout(1, 11, 2), Layout(2, 17, 1)]
    view, _ = make_view(layouts, d=24, seed=3)
    keep = torch.tensor([7, 11, 1])
    sel = SELECTOR.select(view, None, keep)
    assert sel.hidden is None
    assert sel.valid.sum(-1).tolist() == keep.tolist()
    for b, lay in enumerate(layouts):
        feats = view.visual_hidden()[b, : lay.n_visual]
        assert sel.to_lists()[b] == sorted(reference_divprune(feats, int(keep[b])))
        one, _, _ = split_view(view, b)
        assert SELECTOR.select(one, None, keep[b : b + 1]).to_lists() == [sel.to_lists()[b]]
    assert SELECTOR.select(view, None, keep).to_lists() == sel.to_lists()  # deterministic


def test_exact_duplicates_never_picked_twice():
    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    feats = torch.cat([base, base, base])  # every token has two exact duplicates
    picked = max_min_diverse(feats, 7)
    assert len(set(picked)) == 7
    assert {i % 3 for i in picked[:3]} == {0, 1, 2}  # one token per direction first


def test_ties_go_to_the_lower_index():
    feats = torch.eye(4)  # all pairwise distances equal 1
    assert max_min_diverse(feats, 3) == [0, 1, 2]


def test_scale_invariance_and_dtypes():
    feats = torch.randn(25, 16, generator=torch.Generator().manual_seed(5))
    assert max_min_diverse(feats * 7.0, 9) == max_min_diverse(feats, 9)  # cosine: scale-free
    assert max_min_diverse(feats.double(), 9) == max_min_diverse(feats, 9)


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_presets(budget):
    plan = load_preset(f"divprune_{budget}")
    assert plan.positions == "renumber"
    assert [(s.layer, s.scorer, s.selector.name) for s in plan.stages] == [(0, None, "divprune")]
    assert plan.keep_counts(576, 32) == [budget]
    assert plan.layer_average_for(576, 32) == budget
    build_plan(plan, n_layers=32)
