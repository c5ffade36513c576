"""``holov`` (HoloV, arXiv 2510.02912; our reading of the paper) against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from encoder_fixtures import make_encoder_view

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.holov import HoloVSelector, allocate


def reference_allocate(weight: list[float], sizes: list[int], k: int) -> list[int]:
    """Rounds: every region with room gets floor(its weight share among the regions with room x
    what is left), capped at its room (uniform shares when those weights are all 0); a round that
    places nothing gives one token per region with room, largest fractional share first (ties:
    lower region), until k are placed."""
    alloc = [0] * len(sizes)
    while sum(alloc) < k:
        left = k - sum(alloc)
        open_ = [r for r in range(len(sizes)) if alloc[r] < sizes[r]]
        share = {r: weight[r] for r in open_}
        if sum(share.values()) <= 0:
            share = {r: 1.0 for r in open_}
        total = sum(share.values())
        ideal = {r: share[r] / total * left for r in open_}
        add = {r: min(math.floor(ideal[r]), sizes[r] - alloc[r]) for r in open_}
        if sum(add.values()) == 0:
            for r in sorted(open_, key=lambda r: (-(ideal[r] - math.floor(ideal[r])), r))[:left]:
                add[r] = 1
        for r, a in add.items():
            alloc[r] += a
    return alloc


def reference_holov(features, saliency, side: int, crops: int, k: int, temperature: float = 1.0) -> list[int]:
    """Loops, float64: crop of (r, c) = (r*crops//side, c*crops//side); token score = saliency *
    max(0, 1 - mean cosine to the other tokens of its crop); crop weight = (sum of its scores) **
    (1/T), split by :func:`reference_allocate`; within a crop the best scores (ties: lower index)."""
    x = features.double()
    n = side * side
    crop = [(i // side) * crops // side * crops + (i % side) * crops // side for i in range(n)]
    ids = sorted(set(crop))
    members = {c: [i for i in range(n) if crop[i] == c] for c in ids}
    norm = [math.sqrt(float(x[i] @ x[i])) for i in range(n)]

    def cos(a, b):
        return float(x[a] @ x[b]) / (norm[a] * norm[b])

    score = []
    for i in range(n):
        others = [j for j in members[crop[i]] if j != i]
        mean = sum(cos(i, j) for j in others) / len(others) if others else 0.0
        score.append(float(saliency[i]) * max(0.0, 1.0 - mean))
    weight = [sum(score[i] for i in members[c]) ** (1.0 / temperature) for c in ids]
    alloc = reference_allocate(weight, [len(members[c]) for c in ids], k)
    chosen = []
    for r, c in enumerate(ids):
        chosen += sorted(members[c], key=lambda i: (-score[i], i))[: alloc[r]]
    return sorted(chosen)


@pytest.mark.parametrize(
    "side,crops,k,temp", [(8, 4, 12, 1.0), (8, 2, 30, 1.0), (6, 4, 5, 0.5), (7, 3, 20, 2.0), (4, 4, 16, 1.0)]
)
def test_equals_reference(side, crops, k, temp):
    view, sig = make_encoder_view([side], seed=side * k)
    sel = HoloVSelector(HoloVSelector.Settings(crops=crops, temperature=temp)).select(
        view, sig.cls[(-2, "sum")], torch.tensor([k])
    )
    assert sel.to_lists() == [reference_holov(sig.features[0], sig.cls[(-2, "sum")][0], side, crops, k, temp)]
    assert sel.hidden is None


def test_allocation_is_exact_and_capped():
    alloc = allocate(torch.tensor([10.0, 0.0, 1.0, 1.0]), torch.tensor([3, 5, 4, 4]), 9)
    assert alloc.tolist() == [3, 0, 3, 3]
    assert allocate(torch.zeros(3), torch.tensor([2, 2, 2]), 4).tolist() == [2, 1, 1]


def test_ragged_batch_equals_single_runs_and_is_deterministic():
    sides, keep = [8, 5, 6], torch.tensor([16, 5, 11])
    view, sig = make_encoder_view(sides, seed=2)
    scores = sig.cls[(-2, "sum")]
    selector = HoloVSelector(HoloVSelector.Settings())
    sel = selector.select(view, scores, keep)
    assert sel.to_lists() == selector.select(view, scores, keep).to_lists()
    for b, side in enumerate(sides):
        n = side * side
        assert sel.to_lists()[b] == reference_holov(sig.features[b, :n], scores[b, :n], side, 4, int(keep[b]))


def test_encoder_side_only():
    with pytest.raises(PlanError, match="layer 0"):
        build_plan({"stages": [{"layer": 2, "keep": 8, "scorer": "norm", "selector": "holov"}]}, n_layers=4)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets(budget):
    plan = load_preset(f"holov_{budget}")
    build_plan(plan, n_layers=32, adapter=LlavaAdapter)
    assert plan.keep_counts(576, 32) == [budget] and plan.layer_average_for(576, 32) == budget
