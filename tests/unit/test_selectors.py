"""topk / random / uniform selectors and the norm scorer on synthetic TokenViews.

Each method is checked against a slow, obvious reference written here, plus the invariants every
selector must keep: exact counts, ascending unique indices, only valid candidates, determinism,
and batch independence (a batch selects what its samples select alone).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenreduce.core.types import Need, Selection, TokenView
from tokenreduce.strategies.norm import NormScorer
from tokenreduce.strategies.random_select import RandomSelector
from tokenreduce.strategies.topk import TopKSelector
from tokenreduce.strategies.uniform import UniformSelector, lattice_pick, split_budget

PREFIX = 3  # text tokens before the visual run in the synthetic sequences


class FakeSignals:
    provides = Need.HIDDEN | Need.VISUAL_GRID

    def __init__(self, grid: torch.Tensor | None):
        self.grid = grid
        self.grid_calls = 0

    def visual_grid(self) -> torch.Tensor:
        self.grid_calls += 1
        assert self.grid is not None, "this view has no grid"
        return self.grid


def make_view(
    n_visual: list[int], *, d: int = 8, seed: int = 0, grid=None, stage: int = 0, dtype=torch.float32
) -> TokenView:
    """A batch whose sample ``b`` has ``n_visual[b]`` visual tokens after ``PREFIX`` text tokens,
    padded to the batch maximum (``visual_valid`` False beyond ``n_visual[b]``)."""
    B, N = len(n_visual), max(n_visual, default=0)
    S = PREFIX + N + 2
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, d, generator=gen).to(dtype)
    n = torch.tensor(n_visual, dtype=torch.long)
    visual_valid = torch.arange(N).unsqueeze(0) < n.unsqueeze(1)
    visual_index = torch.where(visual_valid, PREFIX + torch.arange(N).unsqueeze(0), torch.zeros(B, N, dtype=torch.long))
    valid = torch.arange(S).unsqueeze(0) < (PREFIX + n + 2).unsqueeze(1)
    original_index = torch.where(visual_valid, visual_index, torch.full_like(visual_index, -1))
    return TokenView(
        layer=2,
        stage=stage,
        hidden=hidden,
        valid=valid,
        visual_index=visual_index,
        visual_valid=visual_valid,
        original_index=original_index,
        n_original_visual=n.clone(),
        signals=FakeSignals(grid),
    )


def sample_view(view: TokenView, b: int) -> TokenView:
    """Sample ``b`` of ``view`` alone, its candidate list trimmed to its own length."""
    n = int(view.n_visual[b])
    grid = view.signals.grid
    return TokenView(
        layer=view.layer,
        stage=view.stage,
        hidden=view.hidden[b : b + 1],
        valid=view.valid[b : b + 1],
        visual_index=view.visual_index[b : b + 1, :n],
        visual_valid=view.visual_valid[b : b + 1, :n],
        original_index=view.original_index[b : b + 1, :n],
        n_original_visual=view.n_original_visual[b : b + 1],
        signals=FakeSignals(None if grid is None else grid[b : b + 1, :n]),
    )


def grid_coords(shapes: list[tuple[int, int]]) -> torch.Tensor:
    """``[n, 3]`` (image, row, col) in raster order for images of the given (rows, cols)."""
    rows = [(img, r, c) for img, (h, w) in enumerate(shapes) for r in range(h) for c in range(w)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def batch_grid(per_sample: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample ``[n_b, 3]`` grids into ``[B, N, 3]`` (zero padded)."""
    N = max(g.shape[0] for g in per_sample)
    out = torch.zeros(len(per_sample), N, 3, dtype=torch.long)
    for b, g in enumerate(per_sample):
        out[b, : g.shape[0]] = g
    return out


def check_selection(sel: Selection, view: TokenView, keep: list[int]) -> list[list[int]]:
    """The invariants of every selection; returns it as lists."""
    assert sel.index.dtype == torch.long and sel.valid.dtype == torch.bool
    assert sel.index.shape == sel.valid.shape and sel.index.shape[0] == view.batch_size
    assert sel.index.shape[1] == max(keep, default=0)
    lists = sel.to_lists()
    for b, (row, k) in enumerate(zip(lists, keep)):
        assert len(row) == k, f"sample {b}: {len(row)} kept, wanted {k}"
        assert sel.valid[b, :k].all() and not sel.valid[b, k:].any(), "valid entries must come first"
        assert row == sorted(set(row)), f"sample {b}: not ascending unique: {row}"
        n = int(view.n_visual[b])
        assert all(0 <= i < n for i in row), f"sample {b}: invalid candidate chosen: {row} (n={n})"
        assert (sel.index[b, k:] == 0).all()
    return lists


def select(selector, view, keep, scores=None) -> list[list[int]]:
    sel = selector.select(view, scores, torch.tensor(keep, dtype=torch.long))
    return check_selection(sel, view, keep)


TOPK = TopKSelector(TopKSelector.Settings())
UNIFORM = UniformSelector(UniformSelector.Settings())


def random_selector(seed=0):
    return RandomSelector(RandomSelector.Settings(seed=seed))


# ============================================================================ topk


def topk_reference(scores: list[float], n: int, k: int) -> list[int]:
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))  # higher first, ties: lower index
    return sorted(ranked[:k])


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_reference_with_ties_and_ragged_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    n_visual = [20, 7, 13, 1]
    view = make_view(n_visual, seed=seed)
    scores = torch.randint(0, 4, (4, 20), generator=gen).float()  # many ties
    scores[~view.visual_valid] = 1e9  # padding must never win, whatever its score
    keep = [5, 7, 4, 1]
    got = select(TOPK, view, keep, scores)
    for b in range(4):
        assert got[b] == topk_reference(scores[b].tolist(), n_visual[b], keep[b])


def test_topk_ties_prefer_lower_index():
    view = make_view([6])
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 2.0]])
    assert select(TOPK, view, [2], scores) == [[1, 3]]
    assert select(TOPK, view, [4], scores) == [[1, 2, 3, 4]]
    assert select(TOPK, make_view([5]), [3], torch.zeros(1, 5)) == [[0, 1, 2]]


def test_topk_padding_with_nan_or_inf_scores_never_chosen():
    view = make_view([6, 3])
    scores = torch.arange(12.0).reshape(2, 6)
    scores[1, 3:] = torch.tensor([float("inf"), float("nan"), 1e30])
    assert select(TOPK, view, [2, 2], scores) == [[4, 5], [1, 2]]


def test_topk_keep_all_and_empty_sample():
    view = make_view([5, 0, 3])
    scores = torch.randn(3, 5)
    assert select(TOPK, view, [5, 0, 3], scores) == [[0, 1, 2, 3, 4], [], [0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_topk_accepts_any_float_scores(dtype):
    view = make_view([8])
    scores = torch.tensor([[0.5, 8, 1, 7, 2, 6, 3, 5]]).to(dtype)
    assert select(TOPK, view, [3], scores) == [[1, 3, 5]]


# ============================================================================ random


def test_random_same_seed_same_choice_and_new_instance():
    view = make_view([100, 60])
    assert select(random_selector(3), view, [10, 10]) == select(random_selector(3), view, [10, 10])


def test_random_different_seeds_differ():
    view = make_view([100])
    picks = {tuple(select(random_selector(seed), view, [10])[0]) for seed in range(8)}
    assert len(picks) == 8


def test_random_stages_draw_independently():
    a = select(random_selector(0), make_view([100], stage=0), [10])
    b = select(random_selector(0), make_view([100], stage=1), [10])
    assert a != b


def test_random_covers_every_candidate():
    # a uniformly random subset: over many seeds every candidate is kept at least once and
    # no candidate is kept almost always (k/n = 1/4; 200 draws -> expected 50 per candidate)
    view = make_view([12])
    counts = torch.zeros(12)
    for seed in range(200):
        counts[select(random_selector(seed), view, [3])[0]] += 1
    assert counts.min() > 20 and counts.max() < 90, counts


# ============================================================================ uniform


def uniform_view(per_sample_grids: list[torch.Tensor]) -> TokenView:
    view = make_view([g.shape[0] for g in per_sample_grids], grid=batch_grid(per_sample_grids))
    return view


def picked_coords(grid: torch.Tensor, picks: list[int]) -> list[tuple[int, int, int]]:
    return [tuple(grid[i].tolist()) for i in picks]


def test_uniform_4x4_k4_one_per_quadrant():
    g = grid_coords([(4, 4)])
    picks = select(UNIFORM, uniform_view([g]), [4])[0]
    quadrants = sorted((r // 2, c // 2) for _, r, c in picked_coords(g, picks))
    assert quadrants == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_uniform_24x24_k144_is_every_other_row_and_column():
    g = grid_coords([(24, 24)])
    picks = select(UNIFORM, uniform_view([g]), [144])[0]
    coords = picked_coords(g, picks)
    rows = sorted({r for _, r, _ in coords})
    cols = sorted({c for _, _, c in coords})
    assert len(rows) == 12 and len(cols) == 12
    assert all(b - a == 2 for a, b in zip(rows, rows[1:])), rows
    assert all(b - a == 2 for a, b in zip(cols, cols[1:])), cols
    assert {(r, c) for _, r, c in coords} == set(itertools.product(rows, cols))


def test_uniform_24x24_k64_is_every_third_row_and_column():
    g = grid_coords([(24, 24)])
    coords = picked_coords(g, select(UNIFORM, uniform_view([g]), [64])[0])
    rows = sorted({r for _, r, _ in coords})
    cols = sorted({c for _, _, c in coords})
    assert len(rows) == 8 and all(b - a == 3 for a, b in zip(rows, rows[1:]))
    assert len(cols) == 8 and all(b - a == 3 for a, b in zip(cols, cols[1:]))
    assert {(r, c) for _, r, c in coords} == set(itertools.product(rows, cols))


def test_uniform_two_images_split_budget_proportionally():
    g = grid_coords([(4, 4), (8, 8)])  # 16 + 64 candidates
    picks = select(UNIFORM, uniform_view([g]), [20])[0]
    coords = picked_coords(g, picks)
    first = [(r, c) for img, r, c in coords if img == 0]
    second = [(r, c) for img, r, c in coords if img == 1]
    assert len(first) == 4 and len(second) == 16  # 20 * 16/80, 20 * 64/80
    assert sorted((r // 2, c // 2) for r, c in first) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows, cols = sorted({r for r, _ in second}), sorted({c for _, c in second})
    assert len(rows) == 4 and len(cols) == 4 and set(second) == set(itertools.product(rows, cols))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (5, 7), (1, 9)])
def test_uniform_exact_counts_for_every_k(shape):
    g = grid_coords([shape])
    n = g.shape[0]
    view = uniform_view([g])
    for k in range(0, n + 1):
        select(UNIFORM, view, [k])


def test_uniform_spreads_over_a_sparse_grid():
    # after an earlier stage: only the left half of an 8x8 grid is left; 8 picks stay spread
    full = grid_coords([(8, 8)])
    g = full[full[:, 2] < 4]
    coords = picked_coords(g, select(UNIFORM, uniform_view([g]), [8])[0])
    assert len({(r // 2) for _, r, _ in coords}) == 4  # every pair of rows gets a pick
    assert len({c for _, _, c in coords}) >= 2


def test_uniform_reads_the_grid_signal_and_declares_it():
    assert UniformSelector.needs & Need.VISUAL_GRID
    assert not UniformSelector.needs_scores
    view = uniform_view([grid_coords([(4, 4)])])
    select(UNIFORM, view, [4])
    assert view.signals.grid_calls == 1


def test_lattice_pick_keeps_all_when_k_covers_n():
    g = grid_coords([(2, 3)])
    assert lattice_pick(g[:, 1], g[:, 2], 6) == list(range(6))
    assert lattice_pick(g[:, 1], g[:, 2], 10) == list(range(6))


# ---------------------------------------------------------------------------- split_budget


@pytest.mark.parametrize(
    ("counts", "k", "expected"),
    [
        ([16, 64], 20, [4, 16]),  # exact proportions
        ([1, 1, 1], 2, [1, 1, 0]),  # equal remainders: lower index first
        ([3, 3], 5, [3, 2]),
        ([2, 10], 11, [2, 9]),  # quotas 1.83, 9.17: the larger remainder gets the extra
        ([10, 2], 11, [9, 2]),
        ([5, 5, 5], 15, [5, 5, 5]),
        ([0, 5], 3, [0, 3]),  # an empty group gets nothing
        ([4, 4], 0, [0, 0]),
        ([], 0, []),
        ([0, 0], 0, [0, 0]),
        ([576], 64, [64]),
    ],
)
def test_split_budget(counts, k, expected):
    assert split_budget(counts, k) == expected


def test_split_budget_invariants():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 30, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        total = sum(counts)
        k = int(torch.randint(0, total + 1, (1,), generator=gen))
        out = split_budget(counts, k)
        assert sum(out) == k
        assert all(0 <= o <= c for o, c in zip(out, counts))
        # largest remainder: no group is more than one away from its exact quota
        assert all(abs(o - k * c / total) < 1 for o, c in zip(out, counts) if total)


# ============================================================================ norm scorer


def norm_reference(view: TokenView) -> torch.Tensor:
    B, N = view.visual_valid.shape
    out = torch.zeros(B, N)
    for b in range(B):
        for i in range(N):
            if view.visual_valid[b, i]:
                vec = view.hidden[b, int(view.visual_index[b, i])].float().tolist()
                out[b, i] = sum(x * x for x in vec) ** 0.5
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_scorer_matches_reference(dtype):
    view = make_view([10, 4, 7], d=16, dtype=dtype)
    scorer = NormScorer(NormScorer.Settings())
    scores = scorer.score(view)
    assert scores.dtype == torch.float32 and scores.shape == (3, 10)
    torch.testing.assert_close(scores, norm_reference(view), rtol=1e-5, atol=1e-5)
    assert (scores[~view.visual_valid] == 0).all()


def test_norm_scorer_reads_visual_positions_not_text():
    view = make_view([3], d=4)
    view.hidden[0, :PREFIX] = 100.0  # huge text tokens must not leak into visual scores
    view.hidden[0, PREFIX : PREFIX + 3] = torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 2.0, 0]])
    torch.testing.assert_close(NormScorer(NormScorer.Settings()).score(view), torch.tensor([[1.0, 3.0, 2.0]]))


def test_norm_then_topk_keeps_largest_norms_and_is_batch_independent():
    view = make_view([12, 5, 9], d=8, seed=4)
    scorer = NormScorer(NormScorer.Settings())
    scores = scorer.score(view)
    keep = [3, 5, 2]
    got = select(TOPK, view, keep, scores)
    ref = norm_reference(view)
    for b, n in enumerate([12, 5, 9]):
        assert got[b] == topk_reference(ref[b].tolist(), n, keep[b])
    batch = got
    for b in range(3):
        alone = sample_view(view, b)
        assert select(TOPK, alone, [keep[b]], scorer.score(alone))[0] == batch[b]
