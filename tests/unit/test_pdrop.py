"""The ``pdrop`` scorer (PyramidDrop, arXiv 2410.17247) against slow references: a python loop
over synthetic attention matrices, and the eager attention weights of a tiny model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from registry_helpers import registry_with
from strategies.baseline_fixtures import Layout, make_view, sample_slots

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import Need, TokenView
from tokenreduce.strategies.pdrop import PDropScorer
from tokenreduce.strategies.topk import TopKSelector, topk_mask
from tokenreduce.testing.tiny import build_tiny, make_inputs

LAYOUTS = [Layout(3, 9, 4), Layout(1, 6, 2), Layout(2, 9, 1)]


def reference_scores(view: TokenView, attn: torch.Tensor) -> list[list[float]]:
    """Per sample: for each visual candidate, the mean over heads of the attention from the last
    valid slot (plain loops over the full ``[B, H, S, S]`` matrix)."""
    out = []
    for b in range(view.batch_size):
        valid, visual, _ = sample_slots(view, b)
        q = valid[-1]
        heads = attn.shape[1]
        out.append([sum(float(attn[b, h, q, j]) for h in range(heads)) / heads for j in visual])
    return out


@pytest.mark.parametrize("offset", [0, -1])
def test_scores_equal_reference_on_synthetic_attention(offset):
    view, signals = make_view(LAYOUTS)
    scores = PDropScorer(PDropScorer.Settings(layer_offset=offset)).score(view)
    assert scores.dtype == torch.float32 and scores.shape == view.visual_valid.shape
    ref = reference_scores(view, signals.attn[offset])
    for b, row in enumerate(ref):
        torch.testing.assert_close(scores[b, : len(row)], torch.tensor(row), atol=1e-6, rtol=0)
        assert bool((scores[b, len(row) :] == 0).all())  # invalid candidates score 0
    ((kind, used_offset, query),) = signals.calls
    assert (kind, used_offset) == ("attention_rows", offset)
    assert query.tolist() == [[view.valid.shape[1] - 1]] * len(LAYOUTS)  # left padding: last slot
    # the stage keeps the top-k by the reference, ties to the lower index
    keep = torch.tensor([4, 3, 9])
    sel = TopKSelector(TopKSelector.Settings()).select(view, scores, keep)
    expected = [sorted(sorted(range(len(r)), key=lambda j: (-r[j], j))[:k]) for r, k in zip(ref, keep.tolist())]
    assert sel.to_lists() == expected


def test_settings():
    assert PDropScorer.Settings().layer_offset == 0  # official: the layer after the drop
    assert PDropScorer.needs == Need.ATTENTION_ROWS
    with pytest.raises(ValidationError):
        PDropScorer.Settings(layer_offset=1)
    with pytest.raises(ValidationError):
        PDropScorer.Settings(lambda_=0.5)
    assert PDropScorer(PDropScorer.Settings()).check_stage(0, 32) is None
    assert "layer >= 1" in PDropScorer(PDropScorer.Settings(layer_offset=-1)).check_stage(0, 32)


# -- on a tiny model: the recomputed row equals the eager attention weights ------------------------
PROMPTS = ["USER: <image> what color is the shape? ASSISTANT:", "<image> what shape is it?"]
RECORDS: list[dict] = []


class RecordingPDrop(PDropScorer):
    def score(self, view: TokenView) -> torch.Tensor:
        scores = super().score(view)
        RECORDS.append({"view": view, "scores": scores.clone()})
        return scores


REGISTRY = registry_with("pdrop", scorers={"rec_pdrop": RecordingPDrop})
_MODELS: dict = {}


def tiny(attn: str):
    if attn not in _MODELS:
        _MODELS[attn] = build_tiny("llava", attn_implementation=attn)
    return _MODELS[attn]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "left_padded_batch"])
@pytest.mark.parametrize("offset", [0, -1])
def test_first_stage_equals_eager_attention_of_the_ranking_layer(prompts, offset):
    layer = 2
    plan = {"stages": [{"layer": layer, "keep": 8, "scorer": {"name": "rec_pdrop", "layer_offset": offset}}]}
    inputs = make_inputs("llava", prompts)
    RECORDS.clear()
    with tokenreduce.apply(tiny("sdpa"), plan, registry=REGISTRY) as att:
        tiny("sdpa")(**inputs)
    view, scores = RECORDS[0]["view"], RECORDS[0]["scores"]
    with torch.no_grad():
        eager = tiny("eager")(**inputs, output_attentions=True).attentions[layer + offset][:, :, -1, :].float()
    expected = eager.mean(1).gather(1, view.visual_index)  # [B, N]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    keep = torch.full((len(prompts),), 8)
    kept = [view.visual_index[b][m].tolist() for b, m in enumerate(topk_mask(expected, view.visual_valid, keep))]
    assert att.trace.stages[0].kept == kept


def test_presets_counts_and_averages():
    expected = {
        "pdrop_192": ([286, 142, 71], 191.9375),
        "pdrop_128": ([201, 70, 24], 128.1875),
        "pdrop_64": ([79, 10, 1], 64.125),
    }
    for name, (counts, average) in expected.items():
        plan = load_preset(name)
        assert plan.positions == "renumber" and plan.description
        assert [(s.layer, s.scorer.name, s.selector.name) for s in plan.stages] == [
            (2, "pdrop", "topk"),
            (12, "pdrop", "topk"),
            (22, "pdrop", "topk"),
        ]
        assert all(s.scorer.settings == {"layer_offset": 0} for s in plan.stages)
        assert plan.keep_counts(576, 32) == counts
        assert plan.layer_average_for(576, 32) == average
        build_plan(plan, n_layers=32)


@pytest.mark.parametrize("lam, name", [(0.498, "pdrop_192"), (0.349, "pdrop_128"), (0.138, "pdrop_64")])
def test_preset_counts_follow_the_geometric_pyramid(lam, name):
    """Stage s keeps int(576 * lambda^s), the official int() of N * ratio (header arithmetic)."""
    assert load_preset(name).keep_counts(576, 32) == [int(576 * lam**s) for s in (1, 2, 3)]


def test_official_default_schedule_average():
    plan = {
        "positions": "renumber",
        "stages": [{"layer": layer, "keep": {"ratio": 0.5}, "scorer": "pdrop"} for layer in (8, 16, 24)],
    }
    compiled = build_plan(plan, n_layers=32)
    assert compiled.keep_counts(576) == [288, 144, 72]
    assert compiled.plan.layer_average_for(576, 32) == 270.0


def test_k0_with_offset_minus_one_fails_at_build():
    with pytest.raises(PlanError, match=r"stages\.0\.scorer"):
        build_plan({"stages": [{"layer": 0, "keep": 4, "scorer": {"name": "pdrop", "layer_offset": -1}}]}, n_layers=4)
