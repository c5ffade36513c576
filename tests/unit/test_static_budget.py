"""Keep counts before the image is seen and the position layout of a reduced prompt
(``tokenreduce.core.static_budget``): equal to what the transformers path keeps and lays out, on
the shipped reference models, for several plans and image sizes; the refusals name the stages."""

from __future__ import annotations

import pytest
import torch
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.adapters.cut import slots as sl
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.static_budget import encoder_side_problems, encoder_stage, reduced_positions, static_keep_count
from tokenreduce.core.strategy import Scorer
from tokenreduce.core.types import Need
from tokenreduce.reference import data, load_reference

PLANS = {
    "tokens": {"stages": [{"layer": 0, "keep": 16, "scorer": "norm"}]},
    "ratio": {"stages": [{"layer": 0, "keep": {"ratio": 0.25}, "selector": "uniform"}]},
    "ratio_odd": {"stages": [{"layer": 0, "keep": {"ratio": 0.29}, "selector": "divprune"}]},
    "over": {"stages": [{"layer": 0, "keep": 100000, "selector": "random"}]},
    "layer_average": {
        "layer_average": {"ratio": 0.25},
        "stages": [{"layer": 0, "keep": {"weight": 1.0}, "scorer": "norm"}],
    },
}
_MODELS: dict = {}


def model(name):
    if name not in _MODELS:
        _MODELS[name] = load_reference(name)
    return _MODELS[name]


def kept_by_transformers(name: str, plan: dict, size: tuple[int, int]) -> tuple[int, int]:
    """(visual tokens before, kept) at the layer-0 stage of one prefill with an image of ``size``."""
    m, processor = model(name)
    image = data.load_split("test").image(0).resize(size)
    arch = m.config.model_type
    inputs = processor(images=[image], text=[data.prompt("what shape is it?", arch)], return_tensors="pt")
    with torch.no_grad(), tokenreduce.apply(m, plan) as att:
        m(**inputs)
    st = att.trace.stages[0]
    return st.visual_before[0], st.visual_after[0]


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize(
    "name,sizes",
    [("easyvqa-llava", [(64, 64)]), ("easyvqa-qwen2_5_vl", [(64, 64), (96, 48), (40, 120)])],
)
def test_static_keep_count_equals_what_the_transformers_path_keeps(name, sizes, plan):
    m, _ = model(name)
    compiled = build_plan(PLANS[plan], n_layers=m.config.text_config.num_hidden_layers)
    for size in sizes:
        before, after = kept_by_transformers(name, PLANS[plan], size)
        assert static_keep_count(compiled, before) == after, (size, before)


def test_qwen_counts_follow_the_image_size():
    compiled = build_plan(PLANS["ratio"])
    counts = {
        static_keep_count(compiled, kept_by_transformers("easyvqa-qwen2_5_vl", PLANS["ratio"], s)[0])
        for s in [(64, 64), (96, 48), (40, 120)]
    }
    assert len(counts) > 1


def test_no_plan_and_no_visual_tokens_keep_everything():
    assert static_keep_count(build_plan({}), 144) == 144
    assert static_keep_count(build_plan(PLANS["tokens"]), 0) == 0


@pytest.mark.parametrize(
    "plan,words",
    [
        ("ref_fastv_22", ["stages.0", "fastv", "decoder signals [attention_rows]"]),
        ("ref_pio_ve_11", ["stages.1", "pio", "inside the decoder"]),
        ({"stages": [{"layer": 0, "keep": 8, "selector": "dart"}]}, []),  # dart refuses layer 0 itself
        ("ref_pdrop_22", ["inside the decoder"]),
    ],
)
def test_llm_side_stages_are_refused_naming_the_stage_and_transformers(plan, words):
    try:
        compiled = build_plan(plan, n_layers=4)
    except PlanError:
        return  # refused earlier, by the component's own stage check
    with pytest.raises(PlanError) as err:
        static_keep_count(compiled, 144)
    message = str(err.value)
    assert "transformers" in message and "tokenreduce.apply" in message
    for w in words:
        assert w in message


class RowsScorer(Scorer):
    """A layer-0 scorer that reads decoder attention rows (test only)."""

    needs = Need.ATTENTION_ROWS

    def score(self, view):
        raise AssertionError("not run")


def test_a_layer0_stage_reading_decoder_signals_is_refused():
    registry = registry_with("static_budget", scorers={"rows": RowsScorer})
    compiled = build_plan({"stages": [{"layer": 0, "keep": 8, "scorer": "rows"}]}, n_layers=4, registry=registry)
    problems = encoder_side_problems(compiled)
    assert len(problems) == 1 and "attention_rows" in problems[0] and "rows" in problems[0]
    with pytest.raises(PlanError, match="decoder signals"):
        encoder_stage(compiled, "vLLM")


def test_encoder_only_plans_pass_and_keep_their_policy():
    for policy in ("keep", "renumber"):
        stage = encoder_stage(build_plan({**PLANS["tokens"], "positions": policy}), "vLLM")
        assert stage.policy == policy and stage.stage is not None
    assert encoder_side_problems(build_plan("ref_visionzip_22")) == []


def test_bad_n_visual_is_refused():
    compiled = build_plan(PLANS["tokens"])
    for bad in (-1, 1.5, True, "144"):
        with pytest.raises(ValueError, match="n_visual"):
            static_keep_count(compiled, bad)


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_reduced_positions_match_the_cut_slots(policy):
    """The layout equals what the transformers path's cut gives the kept tokens (slots.reduce)."""
    gen = torch.Generator().manual_seed(0)
    s = 40
    positions = torch.stack([torch.arange(s), torch.arange(s) // 2, torch.arange(s) % 7])  # [3, S] M-RoPE-like
    visual = torch.zeros(s, dtype=torch.bool)
    visual[5:29] = True
    kept = ~visual | (torch.rand(s, generator=gen) < 0.3)
    slots = sl.Slots(torch.arange(s).unsqueeze(0), torch.ones(1, s, dtype=torch.bool), positions.unsqueeze(1))
    reduced, _ = sl.reduce(slots, kept.unsqueeze(0), policy)
    ours = reduced_positions(positions, kept, policy)
    assert torch.equal(ours, reduced.pos[:, 0])
    assert torch.equal(reduced_positions(positions[0], kept, policy), reduced.pos[0, 0])


def test_reduced_positions_refuses_bad_masks():
    with pytest.raises(ValueError, match="policy"):
        reduced_positions(torch.arange(4), torch.ones(4, dtype=torch.bool), "contiguous")
    with pytest.raises(ValueError, match="bool mask"):
        reduced_positions(torch.arange(4), torch.ones(3, dtype=torch.bool), "keep")
