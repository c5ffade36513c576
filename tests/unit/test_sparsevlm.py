"""The ``sparsevlm`` scorer and selector (SparseVLM, arXiv 2410.04417) against slow references:
raters, rater attention, recycled-cluster sizes, DPC-KNN clustering and the merged tokens."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from strategies.baseline_fixtures import Layout, make_view, sample_slots

from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import Need, TokenView
from tokenreduce.strategies.sparsevlm import (
    SparseVLMScorer,
    SparseVLMSelector,
    adaptive_keep,
    dpc_knn,
    recycle_sizes,
    select_raters,
)

LAYOUTS = [Layout(3, 30, 7), Layout(1, 18, 3), Layout(2, 26, 5)]


# -- slow references -------------------------------------------------------------------------------
def reference_raters(view: TokenView, b: int) -> list[int]:
    valid, visual, text = sample_slots(view, b)
    if not text:
        return [valid[-1]]
    h = view.hidden[b].double()
    rel = []
    for t in text:
        total = 0.0
        for v in visual:
            logits = [float(h[v] @ h[u]) for u in text]
            m = max(logits)
            exp = [math.exp(x - m) for x in logits]
            total += exp[text.index(t)] / sum(exp)
        rel.append(total / len(visual))
    mean = sum(rel) / len(rel)
    raters = [t for t, r in zip(text, rel) if r > mean]
    return raters or text


def reference_scores(view: TokenView, attn: torch.Tensor, b: int) -> list[float]:
    _, visual, _ = sample_slots(view, b)
    raters = reference_raters(view, b)
    heads = attn.shape[1]
    return [sum(float(attn[b, h, r, v]) for h in range(heads) for r in raters) / (heads * len(raters)) for v in visual]


def reference_sizes(n: int, keep: int, ratio: float = 0.3, per: int = 10) -> tuple[int, int, int]:
    """The least c with c = clusters(n - (keep - c)), by brute force."""
    if keep >= n or keep < 2:
        return min(keep, n), 0, 0
    for c in range(keep):
        d = n - (keep - c)
        r = min(int(d * ratio) + 1, d)
        if min(r // per + 1, r, keep - 1) == c:
            return keep - c, r, c
    raise AssertionError("no fixed point")


def reference_dpc_knn(x: list[list[float]], c: int) -> tuple[list[int], list[int]]:
    r, dim = len(x), len(x[0])
    dist = [
        [math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j]))) / math.sqrt(dim) for j in range(r)] for i in range(r)
    ]
    dens = [math.exp(-sum(v * v for v in sorted(dist[i])[:c]) / c) for i in range(r)]
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(r):
        denser = [dist[i][j] for j in range(r) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        delta.append(min(denser) if denser else dmax)
    score = [delta[i] * dens[i] for i in range(r)]
    centres = sorted(range(r), key=lambda i: (-score[i], i))[:c]
    assign = [min(range(c), key=lambda ci: (dist[i][centres[ci]], ci)) for i in range(r)]
    for ci, i in enumerate(centres):
        assign[i] = ci
    return centres, assign


def reference_select(
    view: TokenView, scores: list[float], b: int, keep: int
) -> tuple[list[int], dict[int, list[float]]]:
    """Kept candidate indices (ascending) and the merged hidden state of each anchor."""
    n = len(scores)
    keep = min(keep, n)
    top, recycled, clusters = reference_sizes(n, keep)
    order = sorted(range(n), key=lambda j: (-scores[j], j))
    kept = order[:top]
    merged = {}
    if clusters:
        pool = order[top : top + recycled]
        slots = [int(view.visual_index[b, j]) for j in pool]
        feats = [[float(v) for v in view.hidden[b, s].double()] for s in slots]
        centres, assign = reference_dpc_knn(feats, clusters)
        for ci, centre in enumerate(centres):
            members = [feats[i] for i in range(len(pool)) if assign[i] == ci]
            merged[pool[centre]] = [sum(col) / len(members) for col in zip(*members)]
        kept += list(merged)
    return sorted(kept), merged


# -- raters and scores -----------------------------------------------------------------------------
def test_raters_equal_reference():
    layouts = LAYOUTS + [Layout(2, 10, 0)]  # the last sample has no text after the image
    view, _ = make_view(layouts, seed=4)
    slots, valid = select_raters(view)
    for b in range(len(layouts)):
        assert slots[b][valid[b]].tolist() == reference_raters(view, b)
    assert valid[3].sum() == 1 and int(slots[3, 0]) == view.valid.shape[1] - 1  # the last valid token


@pytest.mark.parametrize("offset", [0, -1])
def test_scores_equal_reference(offset):
    view, signals = make_view(LAYOUTS, seed=7)
    scores = SparseVLMScorer(SparseVLMScorer.Settings(layer_offset=offset)).score(view)
    assert scores.dtype == torch.float32 and scores.shape == view.visual_valid.shape
    for b, lay in enumerate(LAYOUTS):
        ref = reference_scores(view, signals.attn[offset], b)
        torch.testing.assert_close(scores[b, : lay.n_visual], torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=0)
        assert bool((scores[b, lay.n_visual :] == 0).all())
    assert [c[:2] for c in signals.calls] == [("attention_rows", offset)]


# -- recycling --------------------------------------------------------------------------------------
# the official v1.5 lists (score.py): kept top tokens per pruning layer and what enters each layer
OFFICIAL = {
    192: [(576, 300), (309, 200), (204, 110)],
    128: [(576, 303), (312, 110), (117, 36)],
    64: [(576, 66), (82, 30), (32, 17)],
}


def official_total(n: int, top: int) -> int:
    """What the official code keeps: top + floor((int(0.3 d) + 1) / 10) + 1, d = n - top."""
    d = n - top
    return top + (int(d * 0.3) + 1) // 10 + 1


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_recycle_sizes_reproduce_the_official_top_counts(budget):
    for n, top in OFFICIAL[budget]:
        total = official_total(n, top)
        assert recycle_sizes(n, total)[0] == top
        assert recycle_sizes(n, total) == reference_sizes(n, total)


def test_recycle_sizes_equal_brute_force():
    for n in range(1, 120):
        for keep in range(0, n + 2):
            assert recycle_sizes(n, keep) == reference_sizes(n, keep), (n, keep)
    assert recycle_sizes(576, 309, ratio=0.5, per_cluster=4) == reference_sizes(576, 309, 0.5, 4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [1, 3, 6])
def test_dpc_knn_equals_reference(seed, c):
    x = torch.randn(23, 12, generator=torch.Generator().manual_seed(seed))
    centres, assign = dpc_knn(x, c)
    ref_centres, ref_assign = reference_dpc_knn(x.double().tolist(), c)
    assert centres == ref_centres
    assert assign.tolist() == ref_assign


@pytest.mark.parametrize("keep", [[20, 9, 14], [29, 17, 2], [5, 3, 25], [30, 18, 26]])
def test_selector_equals_reference(keep):
    view, _ = make_view(LAYOUTS, d=12, seed=sum(keep))
    scores = torch.rand(view.visual_valid.shape, generator=torch.Generator().manual_seed(1))
    sel = SparseVLMSelector(SparseVLMSelector.Settings()).select(view, scores, torch.tensor(keep))
    assert sel.valid.sum(-1).tolist() == [min(k, lay.n_visual) for k, lay in zip(keep, LAYOUTS)]
    any_merge = False
    for b, lay in enumerate(LAYOUTS):
        kept, merged = reference_select(view, scores[b, : lay.n_visual].tolist(), b, keep[b])
        assert sel.to_lists()[b] == kept
        for j, cand in enumerate(sel.index[b][sel.valid[b]].tolist()):
            slot = int(view.visual_index[b, cand])
            if cand in merged:  # the anchor carries its cluster's mean
                any_merge = True
                torch.testing.assert_close(
                    sel.hidden[b, j], torch.tensor(merged[cand], dtype=torch.float32), atol=1e-5, rtol=0
                )
            elif sel.hidden is not None:  # every other kept token is unchanged, bit for bit
                assert torch.equal(sel.hidden[b, j], view.hidden[b, slot])
    assert any_merge == any(0 < min(k, lay.n_visual) < lay.n_visual and k >= 2 for k, lay in zip(keep, LAYOUTS))


def test_without_recycling_is_plain_topk():
    view, _ = make_view(LAYOUTS, seed=3)
    scores = torch.rand(view.visual_valid.shape, generator=torch.Generator().manual_seed(3))
    sel = SparseVLMSelector(SparseVLMSelector.Settings(recycle=False)).select(view, scores, torch.tensor([5, 5, 5]))
    assert sel.hidden is None
    for b, lay in enumerate(LAYOUTS):
        s = scores[b, : lay.n_visual].tolist()
        assert sel.to_lists()[b] == sorted(sorted(range(lay.n_visual), key=lambda j: (-s[j], j))[:5])


def test_selector_needs_scores_of_the_right_shape():
    view, _ = make_view(LAYOUTS)
    selector = SparseVLMSelector(SparseVLMSelector.Settings())
    with pytest.raises(ValueError, match="needs scores"):
        selector.select(view, None, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match=r"scores must be \[B, N\]"):
        selector.select(view, torch.zeros(3, 2), torch.tensor([3, 3, 3]))


def test_adaptive_rank_rule():
    relation = torch.zeros(5, 40)
    relation[0, :10] = 1.0
    relation[1, 10:20] = 1.0
    relation[2] = relation[0] + relation[1]  # rank 2
    assert adaptive_keep(relation, scale=13.5, bias=0.0) == 27
    assert adaptive_keep(relation, scale=9.0, bias=6.0) == 24
    assert adaptive_keep(relation, scale=100.0, bias=0.0) == 39  # at most N - 1


def test_settings_and_needs():
    assert SparseVLMScorer.Settings().layer_offset == 0
    assert SparseVLMScorer.needs == Need.HIDDEN | Need.ATTENTION_ROWS
    st = SparseVLMSelector.Settings()
    assert (st.recycle, st.recycle_ratio, st.per_cluster) == (True, 0.3, 10)
    assert SparseVLMSelector.needs_scores is True
    for bad in ({"recycle_ratio": 0.0}, {"recycle_ratio": 1.5}, {"per_cluster": 0}, {"ratio": 0.3}):
        with pytest.raises(ValidationError):
            SparseVLMSelector.Settings(**bad)
    assert "layer_offset=0" in SparseVLMScorer(SparseVLMScorer.Settings(layer_offset=-1)).check_stage(0, 32)


@pytest.mark.parametrize(
    "budget, counts, average",
    [(192, [309, 204, 113], 192.03125), (128, [312, 117, 39], 128.625), (64, [82, 32, 18], 64.8125)],
)
def test_presets(budget, counts, average):
    plan = load_preset(f"sparsevlm_{budget}")
    assert plan.positions == "renumber"
    assert [(s.layer, s.scorer.name, s.selector.name) for s in plan.stages] == [
        (2, "sparsevlm", "sparsevlm"),
        (6, "sparsevlm", "sparsevlm"),
        (15, "sparsevlm", "sparsevlm"),
    ]
    assert plan.keep_counts(576, 32) == counts
    assert plan.layer_average_for(576, 32) == average
    # each stage's total is the official top count plus its recycled clusters
    entering = [576] + counts[:-1]
    assert [official_total(n, top) for n, (_, top) in zip(entering, OFFICIAL[budget])] == counts
    build_plan(plan, n_layers=32)
