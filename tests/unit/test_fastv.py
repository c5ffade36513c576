"""The ``fastv`` scorer: recomputed attention rows equal the eager attention weights of the model."""

from __future__ import annotations

import pytest
import torch
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import TokenView
from tokenreduce.strategies.fastv import FastVScorer, last_valid_slot
from tokenreduce.strategies.topk import topk_mask
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPTS = ["USER: <image> what color is the shape? ASSISTANT:", "<image> what shape is it?"]
RECORDS: list[dict] = []


class RecordingFastV(FastVScorer):
    def score(self, view: TokenView) -> torch.Tensor:
        scores = super().score(view)
        RECORDS.append({"view": view, "scores": scores.clone()})
        return scores


REGISTRY = registry_with("fastv", scorers={"rec_fastv": RecordingFastV})
_MODELS: dict = {}


def tiny(attn="sdpa", kv_heads=4):
    """Tiny LLaVA (4 query heads); ``kv_heads=2`` gives grouped-query attention."""
    if (attn, kv_heads) not in _MODELS:
        _MODELS[attn, kv_heads] = build_tiny("llava", attn_implementation=attn, num_key_value_heads=kv_heads)
    return _MODELS[attn, kv_heads]


def fastv_plan(layer=2, keep=None, layer_offset=None):
    scorer = "rec_fastv" if layer_offset is None else {"name": "rec_fastv", "layer_offset": layer_offset}
    return {"stages": [{"layer": layer, "keep": keep or {"ratio": 0.5}, "scorer": scorer, "selector": "topk"}]}


def run(model, plan, prompts):
    RECORDS.clear()
    inputs = make_inputs("llava", prompts)
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return att, list(RECORDS), out


def eager_last_row(prompts, layer: int, kv_heads: int = 4) -> torch.Tensor:
    """``[B, H, S]``: attention of the last slot in decoder ``layer`` from ``output_attentions``
    on an eager copy of the model (same weights), no tokenreduce attached."""
    inputs = make_inputs("llava", prompts)
    with torch.no_grad():
        out = tiny("eager", kv_heads)(**inputs, output_attentions=True)
    return out.attentions[layer][:, :, -1, :].float()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "left_padded_batch"])
@pytest.mark.parametrize("layer", [1, 2])
def test_attention_rows_equal_eager_weights(prompts, layer, kv_heads):
    att, rec, _ = run(tiny("sdpa", kv_heads), fastv_plan(layer), prompts)
    view, scores = rec[0]["view"], rec[0]["scores"]
    eager = eager_last_row(prompts, layer - 1, kv_heads)  # [B, H, S]
    query = last_valid_slot(view.valid)
    assert query.tolist() == [view.hidden.shape[1] - 1] * len(prompts)  # left padding: last slot
    rows = view.signals.attention_rows(query.unsqueeze(1), layer_offset=-1)  # [B, H, 1, S]
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows[:, :, 0], eager, rtol=0, atol=1e-5)
    if len(prompts) > 1:
        assert bool((rows[1, :, 0][:, ~view.valid[1]] == 0).all())  # padding keys get nothing
    expected = eager.mean(1).gather(1, view.visual_index)  # [B, N]
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # the kept tokens are the top half by the eager attention
    keep = torch.full((len(prompts),), 8)
    kept = [view.visual_index[b][m].tolist() for b, m in enumerate(topk_mask(expected, view.visual_valid, keep))]
    assert att.trace.stages[0].kept == kept


@pytest.mark.parametrize("layer", [0, 2])
def test_layer_offset_0_ranks_by_the_cut_layers_own_attention(layer):
    """The extension for shallow models: the cut layer's attention on its input, also at layer 0."""
    att, rec, _ = run(tiny("sdpa"), fastv_plan(layer, layer_offset=0), PROMPTS)
    view, scores = rec[0]["view"], rec[0]["scores"]
    eager = eager_last_row(PROMPTS, layer)  # layer K itself, from output_attentions
    expected = eager.mean(1).gather(1, view.visual_index)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert att.trace.stages[0].layer == layer and att.trace.stages[0].visual_after == [8, 8]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_selection_in_generate(attn):
    model = tiny(attn)
    att, rec, out = run(model, fastv_plan(2), PROMPTS)
    assert att.trace.stages[0].layer == 2
    assert att.trace.stages[0].visual_before == [16, 16] and att.trace.stages[0].visual_after == [8, 8]
    assert out.shape[1] == make_inputs("llava", PROMPTS)["input_ids"].shape[1] + 3
    assert model.config.text_config._attn_implementation == attn  # never switched


def test_k0_fails_at_build():
    with pytest.raises(PlanError, match=r"layer >= 1"):
        build_plan(fastv_plan(0), n_layers=4, registry=REGISTRY)
    with pytest.raises(PlanError, match=r"stages\.0\.scorer"):
        tokenreduce.apply(tiny("sdpa"), fastv_plan(0), registry=REGISTRY)


@pytest.mark.parametrize(
    "name,keep,average", [("fastv_64", 30, 64.125), ("fastv_128", 98, 127.875), ("fastv_192", 166, 191.625)]
)
def test_presets(name, keep, average):
    plan = load_preset(name)
    assert plan.description and plan.positions == "keep"
    assert [(s.layer, s.scorer.name, s.selector.name) for s in plan.stages] == [(2, "fastv", "topk")]
    assert plan.keep_counts(576, 32) == [keep]
    assert plan.layer_average_for(576, 32) == average
    build_plan(plan, n_layers=32, registry=REGISTRY)


def test_right_after_another_stage():
    plan = {"stages": [{"layer": 1, "keep": 10, "selector": "uniform"}, fastv_plan(2, keep=5)["stages"][0]]}
    run(tiny("sdpa"), plan, PROMPTS)
