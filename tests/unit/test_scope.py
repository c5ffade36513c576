"""``scope`` (SCOPE, arXiv 2510.24214) against a slow greedy reference."""

from __future__ import annotations

import math

import pytest
import torch
from encoder_fixtures import make_encoder_view

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.scope import SCOPESelector, scope_greedy


def reference_scope(features, saliency, k: int, alpha: float = 1.0) -> list[int]:
    """Python loops, float64: gain(i) = sum_j max(0, cos(j, i) - covered(j)); pick the unselected
    token with the largest gain * saliency**alpha (ties: lower index); covered(j) = max cos to
    the picked tokens (0 before any pick)."""
    x = features.double()
    n = x.shape[0]
    norm = [math.sqrt(float(x[i] @ x[i])) for i in range(n)]
    cos = [[float(x[i] @ x[j]) / (norm[i] * norm[j]) for j in range(n)] for i in range(n)]
    covered = [0.0] * n
    picked: list[int] = []
    for _ in range(k):
        best, best_val = None, -math.inf
        for i in range(n):
            if i in picked:
                continue
            gain = sum(max(0.0, cos[j][i] - covered[j]) for j in range(n))
            val = gain * float(saliency[i]) ** alpha
            if val > best_val:
                best, best_val = i, val
        picked.append(best)
        covered = [max(covered[j], cos[j][best]) for j in range(n)]
    return picked


@pytest.mark.parametrize("k,alpha", [(1, 1.0), (5, 1.0), (12, 1.0), (12, 0.0), (16, 2.0)])
def test_equals_reference(k, alpha):
    view, sig = make_encoder_view([4], seed=k)
    feats, sal = sig.features[0], sig.cls[(-2, "sum")][0]
    assert scope_greedy(feats, sal, k, alpha).tolist() == reference_scope(feats, sal, k, alpha)
    sel = SCOPESelector(SCOPESelector.Settings(alpha=alpha)).select(view, sig.cls[(-2, "sum")], torch.tensor([k]))
    assert sel.to_lists() == [sorted(reference_scope(feats, sal, k, alpha))]
    assert sel.hidden is None


def test_ragged_batch_equals_single_runs_and_is_deterministic():
    sides, keep = [5, 3, 4], torch.tensor([8, 9, 3])
    view, sig = make_encoder_view(sides, seed=5)
    scores = sig.cls[(-2, "sum")]
    selector = SCOPESelector(SCOPESelector.Settings())
    sel = selector.select(view, scores, keep)
    assert sel.to_lists() == selector.select(view, scores, keep).to_lists()
    for b, side in enumerate(sides):
        n = side * side
        assert sel.to_lists()[b] == sorted(reference_scope(sig.features[b, :n], scores[b, :n], int(keep[b])))


def test_encoder_side_only():
    with pytest.raises(PlanError, match="layer 0"):
        build_plan({"stages": [{"layer": 3, "keep": 8, "scorer": "norm", "selector": "scope"}]}, n_layers=4)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets(budget):
    plan = load_preset(f"scope_{budget}")
    build_plan(plan, n_layers=32, adapter=LlavaAdapter)
    assert plan.keep_counts(576, 32) == [budget] and plan.layer_average_for(576, 32) == budget
