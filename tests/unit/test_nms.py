"""The ``nms`` selector against a slow, obvious greedy reference (``docs/strategies/nms.md``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tokenreduce.core.types import Need, TokenView
from tokenreduce.strategies import nms as nms_module
from tokenreduce.strategies.nms import NMSSelector, greedy_nms_mask, saliency_order

PREFIX = 3  # text tokens before the visual span
SUFFIX = 2  # text tokens after it


class _NoSignals:
    provides = Need.HIDDEN


def make_view(feats: list[torch.Tensor], dtype=torch.float32, seed: int = 0) -> TokenView:
    """A TokenView for a ragged batch: sample ``b`` has the visual rows ``feats[b]`` (``[n_b, d]``)
    between PREFIX and SUFFIX random text tokens, right-padded with random junk to a common S."""
    gen = torch.Generator().manual_seed(seed)
    B = len(feats)
    d = feats[0].shape[-1]
    ns = [f.shape[0] for f in feats]
    N = max(ns) if ns else 0
    S = PREFIX + N + SUFFIX
    hidden = torch.randn(B, S, d, generator=gen)  # junk everywhere, visual rows overwritten below
    valid = torch.zeros(B, S, dtype=torch.bool)
    visual_index = torch.zeros(B, N, dtype=torch.long)
    visual_valid = torch.zeros(B, N, dtype=torch.bool)
    original_index = torch.full((B, N), -1, dtype=torch.long)
    for b, f in enumerate(feats):
        n = f.shape[0]
        hidden[b, PREFIX : PREFIX + n] = f
        valid[b, : PREFIX + n + SUFFIX] = True
        visual_index[b, :n] = torch.arange(PREFIX, PREFIX + n)
        visual_valid[b, :n] = True
        original_index[b, :n] = torch.arange(PREFIX, PREFIX + n)
    return TokenView(
        layer=2,
        stage=0,
        hidden=hidden.to(dtype),
        valid=valid,
        visual_index=visual_index,
        visual_valid=visual_valid,
        original_index=original_index,
        n_original_visual=torch.tensor(ns),
        signals=_NoSignals(),
    )


def pad_scores(scores: list[torch.Tensor], junk: float = 1e9) -> torch.Tensor:
    """``[B, N]`` scores; invalid slots get a huge junk score (must never be selected)."""
    N = max(s.shape[0] for s in scores)
    out = torch.full((len(scores), N), junk)
    for b, s in enumerate(scores):
        out[b, : s.shape[0]] = s
    return out


def reference_nms(feat: torch.Tensor, scores: torch.Tensor, k: int, tau: float) -> list[int]:
    """Plain greedy NMS with fill-up over the full similarity matrix, python loops (docs/pio-fvlm.md#pseudocode)."""
    n = feat.shape[0]
    k = min(max(k, 0), n)
    x = F.normalize(feat.float(), dim=-1)
    sim = x @ x.T  # full N x N, float32
    hits = (sim >= torch.tensor(tau, dtype=torch.float32)).tolist()
    s = [(-math.inf if math.isnan(v) else v) for v in scores.float().tolist()]
    order = sorted(range(n), key=lambda i: (-s[i], i))  # descending score, lower index first
    chosen: list[int] = []
    suppressed = [False] * n
    for i in order:
        if len(chosen) == k:
            break
        if suppressed[i]:
            continue
        chosen.append(i)
        for j in range(n):
            if hits[i][j]:
                suppressed[j] = True
    for i in order:  # fill-up
        if len(chosen) == k:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def run(feats, scores, keep, tau=0.8, dtype=torch.float32):
    view = make_view(feats, dtype=dtype)
    sel = NMSSelector(NMSSelector.Settings(threshold=tau))
    out = sel.select(view, pad_scores(scores), torch.tensor(keep))
    assert out.valid.sum(-1).tolist() == [min(max(k, 0), f.shape[0]) for k, f in zip(keep, feats)]
    for row, v in zip(out.index, out.valid):
        r = row[v]
        assert torch.all(r[1:] > r[:-1]), "indices must be strictly ascending"
    # the batched rounds (the default off CPU) and the per-sample rounds agree
    order = saliency_order(pad_scores(scores), view.visual_valid)
    args = (view.hidden, view.visual_index, order, view.n_visual, torch.tensor(keep), tau)
    batched = greedy_nms_mask(*args, batched=True)
    assert torch.equal(batched, greedy_nms_mask(*args, batched=False))
    assert [torch.nonzero(r).flatten().tolist() for r in batched] == out.to_lists()
    return out.to_lists()


def expected(feats, scores, keep, tau=0.8, dtype=torch.float32):
    return [reference_nms(f.to(dtype), s, k, tau) for f, s, k in zip(feats, scores, keep)]


# ---------------------------------------------------------------- settings


def test_settings_defaults_and_validation():
    assert NMSSelector.Settings().threshold == 0.8
    assert NMSSelector.needs == Need.HIDDEN and NMSSelector.needs_scores is True
    NMSSelector.Settings(threshold=1.0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError, match="0 < threshold <= 1"):
            NMSSelector.Settings(threshold=bad)
    with pytest.raises(ValidationError):
        NMSSelector.Settings(tau=0.8)  # extra fields are forbidden


def test_scores_required():
    view = make_view([torch.randn(4, 8)])
    with pytest.raises(ValueError, match="needs scores"):
        NMSSelector(NMSSelector.Settings()).select(view, None, torch.tensor([2]))


# ---------------------------------------------------------------- behaviour


def test_duplicates_suppressed():
    base = torch.eye(4, 16)  # 4 mutually orthogonal directions
    # candidate order by score: 0 (dir 0), 1 (dup of 0), 2 (dir 1), 3 (dup of 1), 4 (dir 2), 5 (dir 3)
    feat = torch.stack([base[0], base[0] * 3, base[1], base[1] + 0.01, base[2], base[3]])
    scores = torch.tensor([6.0, 5, 4, 3, 2, 1])
    got = run([feat], [scores], [4])
    assert got == [[0, 2, 4, 5]]
    assert got == expected([feat], [scores], [4])
    # top-k would have kept 0..3; with k=2 only the two distinct directions survive
    assert run([feat], [scores], [2]) == [[0, 2]]


def test_fill_up_walks_same_order():
    # everything is a near-duplicate of everything: NMS accepts one token, fill-up adds by score
    g = torch.Generator().manual_seed(1)
    feat = torch.ones(10, 32) + 1e-3 * torch.randn(10, 32, generator=g)
    scores = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    got = run([feat], [scores], [4])
    assert got == [[1, 3, 5, 7]]  # the 4 highest scores
    assert got == expected([feat], [scores], [4])


def test_fill_up_after_partial_nms():
    # two clusters, k=4: accept the top of each cluster, then fill-up with the highest leftovers
    a, b = torch.eye(2, 8)
    feat = torch.stack([a, a, b, a, b, b])
    scores = torch.tensor([5.0, 4, 3, 2, 1, 0])
    # NMS: accept 0 (cluster a), 2 (cluster b); fill-up in order: 1, 3
    assert run([feat], [scores], [4]) == [[0, 1, 2, 3]]
    assert run([feat], [scores], [3]) == [[0, 1, 2]]
    assert run([feat], [scores], [2]) == [[0, 2]]


def test_similarity_exactly_threshold_is_suppressed():
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.8, 0.6])
    x = F.normalize(torch.stack([u, v]), dim=-1)
    cos = (x @ x.T)[0, 1]
    assert cos == torch.tensor(0.8, dtype=torch.float32)  # exactly τ in float32
    w = torch.tensor([-1.0, 0.0])  # far from both
    feat = torch.stack([u, v, w])
    scores = torch.tensor([3.0, 2.0, 1.0])
    # inclusive: v is suppressed by u, so w is taken before v
    assert run([feat], [scores], [2], tau=0.8) == [[0, 2]]
    # just above the cosine: v survives
    assert run([feat], [scores], [2], tau=0.8000001) == [[0, 1]]
    # symmetric case: v accepted first suppresses u
    assert run([feat], [torch.tensor([2.0, 3.0, 1.0])], [2]) == [[1, 2]]


def test_similarity_exactly_threshold_across_rounds():
    """The exact-τ pair is split over two rounds: v is suppressed by u through the comparison
    with the already accepted set (not the in-block one)."""
    d = 40
    u = torch.zeros(d)
    u[0] = 1.0
    v = torch.zeros(d)
    v[0], v[1] = 0.8, 0.6
    w = torch.zeros(d)
    w[2] = 1.0
    others = torch.eye(d)[3:6]  # orthogonal to u, v, w
    # rank 0: u; ranks 1..30: w and 29 copies of it; then v; then the others
    feat = torch.cat([u[None], w.expand(30, d), v[None], others])
    scores = -torch.arange(feat.shape[0], dtype=torch.float32)
    k = 5  # the first window (about 1.1 k + 8 ranks) ends inside the copies of w
    got = run([feat], [scores], [k])
    assert got == expected([feat], [scores], [k])
    assert got == [[0, 1, 32, 33, 34]]  # u, w and the three others; v (31) suppressed


def test_score_ties_lower_index_first():
    feat = torch.eye(6, 8)  # all orthogonal: pure score order
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0, 2.0])
    assert run([feat], [scores], [2]) == [[1, 2]]
    assert run([feat], [scores], [5]) == [[0, 1, 2, 3, 5]]
    # ties between near-duplicates: the lower index is accepted and suppresses the other
    dup = torch.stack([torch.ones(8)] * 3 + [torch.eye(8)[0]])
    assert run([dup], [torch.tensor([1.0, 1.0, 1.0, 0.0])], [2]) == [[0, 3]]


def test_nan_scores_rank_last():
    feat = torch.eye(4, 8)
    scores = torch.tensor([float("nan"), 1.0, float("nan"), 0.5])
    assert run([feat], [scores], [3]) == [[0, 1, 3]]
    assert run([feat], [scores], [3]) == expected([feat], [scores], [3])


def test_keep_all_and_more():
    g = torch.Generator().manual_seed(2)
    feat = torch.ones(7, 16) + 1e-3 * torch.randn(7, 16, generator=g)
    scores = torch.randn(7, generator=g)
    assert run([feat], [scores], [7]) == [list(range(7))]
    assert run([feat], [scores], [9]) == [list(range(7))]  # clamped to n_visual


def test_zero_keep_rows_and_empty_samples():
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(6, 16, generator=g), torch.randn(5, 16, generator=g), torch.zeros(0, 16)]
    scores = [torch.randn(6, generator=g), torch.randn(5, generator=g), torch.zeros(0)]
    keep = [0, 3, 0]
    got = run(feats, scores, keep)
    assert got[0] == [] and got[2] == []
    assert got == expected(feats, scores, keep)
    assert run(feats, scores, [0, 0, 0]) == [[], [], []]
    # no sample has a visual token (N = 0)
    assert run([torch.zeros(0, 16)] * 2, [torch.zeros(0)] * 2, [0, 0]) == [[], []]


def test_ragged_batch_never_selects_padding():
    g = torch.Generator().manual_seed(4)
    ns = [12, 5, 9, 1]
    feats = [torch.randn(n, 24, generator=g) for n in ns]
    feats[0][6:] = feats[0][0]  # many duplicates in sample 0
    scores = [torch.randn(n, generator=g) for n in ns]
    keep = [10, 5, 3, 1]  # sample 0 needs the fill-up, sample 1 keeps everything
    got = run(feats, scores, keep)  # padding slots carry a huge junk score
    assert got == expected(feats, scores, keep)
    for row, n in zip(got, ns):
        assert all(i < n for i in row)


def test_batch_equals_single_samples_and_deterministic():
    g = torch.Generator().manual_seed(5)
    ns = [40, 17, 33]
    centres = torch.randn(6, 32, generator=g)
    feats = [centres[torch.randint(0, 6, (n,), generator=g)] + 0.3 * torch.randn(n, 32, generator=g) for n in ns]
    scores = [torch.randn(n, generator=g) for n in ns]
    keep = [12, 9, 20]
    batch = run(feats, scores, keep)
    singles = [run([f], [s], [k])[0] for f, s, k in zip(feats, scores, keep)]
    assert batch == singles
    assert batch == run(feats, scores, keep)
    assert batch == expected(feats, scores, keep)


def test_bfloat16_hidden_states():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(5, 64, generator=g)
    feat = centres[torch.randint(0, 5, (50,), generator=g)] + 0.4 * torch.randn(50, 64, generator=g)
    scores = torch.randn(50, generator=g)
    got = run([feat], [scores], [15], dtype=torch.bfloat16)
    assert got == expected([feat], [scores], [15], dtype=torch.bfloat16)


def test_reuses_cached_visual_hidden():
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(20, 16, generator=g), torch.randn(11, 16, generator=g)]
    feats[0][10:] = feats[0][:10] * 2  # duplicates
    scores = [torch.randn(20, generator=g), torch.randn(11, generator=g)]
    view = make_view(feats)
    view.visual_hidden()  # materialise the cache, as a scorer would
    out = NMSSelector(NMSSelector.Settings()).select(view, pad_scores(scores), torch.tensor([8, 4]))
    assert out.to_lists() == expected(feats, scores, [8, 4])


# ---------------------------------------------------------------- fuzz


def _clustered(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    kind = int(torch.randint(0, 4, (1,), generator=g))
    if kind == 0:  # isotropic
        return torch.randn(n, d, generator=g)
    n_c = int(torch.randint(1, max(2, n // 2) + 1, (1,), generator=g))
    centres = torch.randn(n_c, d, generator=g)
    spread = float(torch.rand(1, generator=g)) * (1.5 if kind == 1 else 0.3)
    x = centres[torch.randint(0, n_c, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    if kind == 3:  # exact duplicates and a zero row
        x[n // 2 :] = x[: n - n // 2].clone()
        x[0] = 0
    return x


def _unambiguous_tau(feat: torch.Tensor, candidates=(0.8, 0.7, 0.9, 0.6, 0.95, 0.5)) -> float | None:
    """A threshold no pair lies within float32 rounding of (block and full products may differ in
    the last ulp, which could flip such a pair; see the module docstring)."""
    x = F.normalize(feat.float(), dim=-1)
    sim = x @ x.T
    for tau in candidates:
        if not bool(((sim - tau).abs() < 1e-5).any()):
            return tau
    return None


@pytest.mark.parametrize("seed", range(60))
def test_fuzz_against_reference(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    B = int(torch.randint(1, 5, (1,), generator=g))
    d = int(torch.randint(2, 48, (1,), generator=g))
    feats, scores, keep = [], [], []
    for _ in range(B):
        n = int(torch.randint(0, 90, (1,), generator=g))
        feats.append(_clustered(g, n, d) if n else torch.zeros(0, d))
        s = torch.randn(n, generator=g)
        if n and seed % 3 == 0:  # coarse scores: many ties
            s = torch.round(s * 2) / 2
        scores.append(s)
        keep.append(int(torch.randint(0, n + 2, (1,), generator=g)))
    tau = _unambiguous_tau(torch.cat(feats)) if sum(f.shape[0] for f in feats) else 0.8
    if tau is None:
        pytest.skip("every candidate threshold is ambiguous at float32 rounding for this draw")
    assert run(feats, scores, keep, tau=tau) == expected(feats, scores, keep, tau=tau)


@pytest.mark.parametrize("small_chunks", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_fuzz_large_multi_round(seed, small_chunks, monkeypatch):
    """Bigger N and k so that the blockwise pass needs several rounds and capped survivor sets;
    with ``small_chunks`` the windows are also split into 16-row chunks (early window stop)."""
    if small_chunks:
        monkeypatch.setattr(nms_module, "_CHUNK_ELEMS", 1)
    g = torch.Generator().manual_seed(5000 + seed)
    n, d = 700, 64
    n_c = [3, 40, 150, 400, 700, 10][seed]
    centres = torch.randn(n_c, d, generator=g)
    feat = centres[torch.randint(0, n_c, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g)
    if seed == 5:  # a near-duplicate head then diverse tokens
        feat[:200] = centres[0] + 1e-3 * torch.randn(200, d, generator=g)
        feat[200:] = torch.randn(500, d, generator=g)
    scores = torch.randn(n, generator=g)
    scores[:200] += 10 if seed == 5 else 0
    tau = _unambiguous_tau(feat)
    assert tau is not None
    for k in (1, 37, 180, 420, 699):
        assert run([feat], [scores], [k], tau=tau) == expected([feat], [scores], [k], tau=tau), k


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_ragged_batches_small_chunks(seed, monkeypatch):
    """Ragged batches of mixed difficulty through the chunked, batched rounds."""
    monkeypatch.setattr(nms_module, "_CHUNK_ELEMS", 1)
    g = torch.Generator().manual_seed(9000 + seed)
    d = 32
    feats, scores, keep = [], [], []
    for _ in range(4):
        n = int(torch.randint(1, 300, (1,), generator=g))
        feats.append(_clustered(g, n, d))
        scores.append(torch.randn(n, generator=g))
        keep.append(int(torch.randint(1, n + 1, (1,), generator=g)))
    tau = _unambiguous_tau(torch.cat(feats))
    if tau is None:
        pytest.skip("every candidate threshold is ambiguous at float32 rounding for this draw")
    assert run(feats, scores, keep, tau=tau) == expected(feats, scores, keep, tau=tau)
