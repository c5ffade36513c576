"""``pio_ve`` (PIO-FVLM's encoder-involved mode, ``docs/strategies/pio_ve.md``) against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from encoder_fixtures import make_encoder_view

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.pio_ve import PIOVESelector


def reference_pio_ve(local, glob, hidden, side: int, windows: int, keep: int, merge: bool = True):
    """Loops: m = (keep // 2) // windows^2 best local scores per window (ties: lower index), then
    the best global scores among the rest up to keep; every dropped token joins the kept token of
    largest cosine (first on ties); kept = (kept + sum joined) / (1 + count)."""
    n = side * side
    win = [(i // side) * windows // side * windows + (i % side) * windows // side for i in range(n)]
    m = (keep // 2) // (windows * windows)
    chosen = []
    for w in range(windows * windows):
        members = [i for i in range(n) if win[i] == w]
        chosen += sorted(members, key=lambda i: (-float(local[i]), i))[:m]
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-float(glob[i]), i))
    chosen = sorted(chosen + rest[: keep - len(chosen)])
    if not merge:
        return chosen, hidden[chosen]
    h = hidden.double()

    def cos(a, b):
        return float(h[a] @ h[b]) / math.sqrt(float(h[a] @ h[a]) * float(h[b] @ h[b]))

    groups = {c: [c] for c in chosen}
    for o in range(n):
        if o not in groups:
            groups[max(chosen, key=lambda c: (cos(o, c), -chosen.index(c)))].append(o)
    return chosen, torch.stack([h[groups[c]].mean(0).float() for c in chosen])


@pytest.mark.parametrize("side,windows,keep", [(8, 4, 12), (8, 2, 20), (6, 3, 7), (8, 4, 64), (5, 4, 9)])
def test_equals_reference(side, windows, keep):
    view, sig = make_encoder_view([side], seed=side + keep)
    sel = PIOVESelector(PIOVESelector.Settings(windows=windows)).select(view, None, torch.tensor([keep]))
    index, hidden = reference_pio_ve(
        sig.cls[(5, "mean")][0], sig.cls[(-2, "mean")][0], view.visual_hidden()[0], side, windows, keep
    )
    assert sel.to_lists() == [index]
    torch.testing.assert_close(sel.hidden[0], hidden, atol=1e-5, rtol=1e-5)
    assert ("cls", 5, "mean") in sig.calls and ("cls", -2, "mean") in sig.calls  # head-averaged


def test_without_merge_and_with_ties():
    view, sig = make_encoder_view([8], seed=3, ties=True)
    sel = PIOVESelector(PIOVESelector.Settings(merge=False)).select(view, None, torch.tensor([24]))
    index, _ = reference_pio_ve(
        sig.cls[(5, "mean")][0], sig.cls[(-2, "mean")][0], view.visual_hidden()[0], 8, 4, 24, merge=False
    )
    assert sel.to_lists() == [index] and sel.hidden is None


def test_ragged_batch_equals_single_runs_and_is_deterministic():
    sides, keep = [8, 6, 7], torch.tensor([20, 9, 30])
    view, sig = make_encoder_view(sides, seed=11)
    selector = PIOVESelector(PIOVESelector.Settings())
    sel = selector.select(view, None, keep)
    again = selector.select(view, None, keep)
    assert sel.to_lists() == again.to_lists() and torch.equal(sel.hidden, again.hidden)
    for b, side in enumerate(sides):
        n = side * side
        index, hidden = reference_pio_ve(
            sig.cls[(5, "mean")][b, :n],
            sig.cls[(-2, "mean")][b, :n],
            view.visual_hidden()[b, :n],
            side,
            4,
            int(keep[b]),
        )
        assert sel.to_lists()[b] == index
        torch.testing.assert_close(sel.hidden[b, : int(keep[b])], hidden, atol=1e-5, rtol=1e-5)


def test_encoder_side_only():
    with pytest.raises(PlanError, match="layer 0"):
        build_plan({"stages": [{"layer": 1, "keep": 8, "selector": "pio_ve"}]}, n_layers=4)


@pytest.mark.parametrize(
    "name,encoder,llm,avg", [("pio_ve_192", 288, 96, 192), ("pio_ve_128", 192, 64, 128), ("pio_ve_64", 96, 32, 64)]
)
def test_presets_follow_the_spec_split(name, encoder, llm, avg):
    plan = load_preset(name)
    build_plan(plan, n_layers=32, adapter=LlavaAdapter)
    assert plan.keep_counts(576, 32) == [encoder, llm]
    assert [s.layer for s in plan.stages] == [0, 16]
    assert plan.layer_average_for(576, 32) == avg
    assert plan.stages[1].scorer.name == "pio" and plan.stages[1].selector.name == "nms"
