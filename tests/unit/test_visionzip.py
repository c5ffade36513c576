"""``vision_cls`` + ``visionzip`` (VisionZip, arXiv 2412.04467) against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from encoder_fixtures import make_encoder_view

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.adapters.llava_next import LlavaNextAdapter
from tokenreduce.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.visionzip import CLSAttentionScorer, VisionZipSelector, contextual_count


def reference_visionzip(scores, keys, feats, hidden, projector, keep: int, c: int):
    """Python loops, float64: dominant = top (keep - c) scores (ties: lower index); the rest in
    order; targets at stride max(1, M // c); each other token joins the target with the largest
    key cosine (first one on ties); target feature + mean of its joiners, projected."""
    n = len(scores)
    dominant = sorted(range(n), key=lambda i: (-float(scores[i]), i))[: keep - c]
    rest = [i for i in range(n) if i not in dominant]
    targets = [rest[p] for p in list(range(0, len(rest), max(1, len(rest) // c)))[:c]] if c else []
    k64 = keys.double()

    def cos(a, b):
        return float(k64[a] @ k64[b]) / (math.sqrt(float(k64[a] @ k64[a])) * math.sqrt(float(k64[b] @ k64[b])))

    joined = {t: [] for t in targets}
    for o in rest:
        if o in targets or not targets:
            continue
        best = max(targets, key=lambda t: (cos(o, t), -targets.index(t)))
        joined[best].append(o)
    index = sorted(dominant + targets)
    out = []
    for i in index:
        if i in joined:
            f = feats[i].double()
            if joined[i]:
                f = f + torch.stack([feats[o].double() for o in joined[i]]).mean(0)
            out.append(projector(f.float()).detach())
        else:
            out.append(hidden[i])
    return index, torch.stack(out)


@pytest.mark.parametrize("keep,c", [(12, 3), (20, 5), (5, 0), (9, 9), (36, 6)])
def test_equals_reference(keep, c):
    view, sig = make_encoder_view([6], seed=keep)
    sel = VisionZipSelector(VisionZipSelector.Settings(contextual=c)).select(
        view, sig.vision_cls_attention(-2, "sum"), torch.tensor([keep])
    )
    index, hidden = reference_visionzip(
        sig.cls[(-2, "sum")][0],
        sig.keys[0],
        sig.features[0],
        view.visual_hidden()[0],
        sig.projector,
        keep,
        min(c, keep),
    )
    assert sel.to_lists() == [index]
    assert (sel.hidden is None) == (c == 0)  # nothing merged: the kept tokens stay as they are
    got = sel.hidden[0] if sel.hidden is not None else view.visual_hidden()[0, index]
    torch.testing.assert_close(got, hidden, atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_single_runs_and_is_deterministic():
    view, sig = make_encoder_view([6, 4, 5], seed=7)
    selector = VisionZipSelector(VisionZipSelector.Settings())
    scores = CLSAttentionScorer(CLSAttentionScorer.Settings()).score(view)
    keep = torch.tensor([16, 7, 13])
    sel = selector.select(view, scores, keep)
    again = selector.select(view, scores, keep)
    assert sel.to_lists() == again.to_lists() and torch.equal(sel.hidden, again.hidden)
    for b, side in enumerate([6, 4, 5]):
        n = side * side
        cs = contextual_count(int(keep[b]), n, 5 / 32, None)
        index, hidden = reference_visionzip(
            scores[b, :n],
            sig.keys[b, :n],
            sig.features[b, :n],
            view.visual_hidden()[b, :n],
            sig.projector,
            int(keep[b]),
            cs,
        )
        assert sel.to_lists()[b] == index
        torch.testing.assert_close(sel.hidden[b, : int(keep[b])], hidden, atol=1e-5, rtol=1e-5)
    assert sel.valid.sum(-1).tolist() == keep.tolist()


def test_scorer_reads_the_configured_layer_and_reduction():
    view, sig = make_encoder_view([4], seed=1, layers=(-2, 3))
    scores = CLSAttentionScorer(CLSAttentionScorer.Settings(layer=3, heads="mean")).score(view)
    assert torch.equal(scores, sig.cls[(3, "mean")])
    assert sig.calls == [("cls", 3, "mean")]


@pytest.mark.parametrize("keep,expected", [(192, 30), (128, 20), (64, 10), (1, 0), (7, 1)])
def test_default_split_matches_the_official_scripts(keep, expected):
    assert contextual_count(keep, 576, 5 / 32, None) == expected
    assert contextual_count(keep, 576, 5 / 32, 3) == min(3, keep)


def test_encoder_side_only():
    with pytest.raises(PlanError, match="layer 0"):
        build_plan({"stages": [{"layer": 2, "keep": 8, "scorer": "vision_cls", "selector": "visionzip"}]}, n_layers=4)


@pytest.mark.parametrize("adapter,reason", [(Qwen2_5_VLAdapter, "no CLS token"), (LlavaNextAdapter, "anyres")])
def test_unsupported_adapters_fail_at_plan_build(adapter, reason):
    with pytest.raises(PlanError, match=reason):
        build_plan("visionzip_64", n_layers=32, adapter=adapter)


@pytest.mark.parametrize(
    "name,dominant,contextual", [("visionzip_192", 162, 30), ("visionzip_128", 108, 20), ("visionzip_64", 54, 10)]
)
def test_presets(name, dominant, contextual):
    plan = load_preset(name)
    compiled = build_plan(plan, n_layers=32, adapter=LlavaAdapter)
    assert plan.keep_counts(576, 32) == [dominant + contextual]
    assert plan.layer_average_for(576, 32) == dominant + contextual
    assert compiled.stages[0].selector.settings.contextual == contextual
