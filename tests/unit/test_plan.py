"""Plans, stages and budgets: validation messages and the keep-count arithmetic of every budget form.

The expected numbers are computed by hand in the comments (576 visual tokens = LLaVA-1.5's 24x24
grid; 32 decoder layers = a 7B Llama), never by calling the code under test a second way.
"""

from __future__ import annotations

import re

import pytest

import tokenreduce
from tokenreduce import LayerAverage, Plan, PlanError, Ratio, Stage, Tokens, Weight, build_plan
from tokenreduce.core.plan import CompiledPlan, parse_plan
from tokenreduce.core.registry import get_registry
from tokenreduce.core.types import Need

N_VIS, N_LAYERS = 576, 32


def plan(*stages, **top) -> Plan:
    return parse_plan({"stages": list(stages), **top})


def stage(layer, keep, **kw) -> dict:
    return {"layer": layer, "keep": keep, **kw}


def plan_error(spec, **kw) -> str:
    """The message of the PlanError that building ``spec`` raises."""
    with pytest.raises(PlanError) as info:
        build_plan(spec, **kw)
    return str(info.value)


# ============================================================================ keep forms


@pytest.mark.parametrize("keep", [100, {"tokens": 100}])
def test_token_keep_forms(keep):
    p = plan(stage(1, keep, selector="random"))
    assert p.stages[0].keep == Tokens(tokens=100)
    assert p.keep_counts(N_VIS, N_LAYERS) == [100]


def test_ratio_defaults_to_current():
    p = plan(stage(1, {"ratio": 0.5}, selector="random"))
    assert p.stages[0].keep == Ratio(ratio=0.5, of="current")
    assert p.keep_counts(N_VIS, N_LAYERS) == [288]


def test_ratio_of_current_compounds_and_of_original_does_not():
    current = plan(stage(1, {"ratio": 0.5}), stage(5, {"ratio": 0.25}))
    original = plan(stage(1, {"ratio": 0.5}), stage(5, {"ratio": 0.25, "of": "original"}))
    assert current.keep_counts(N_VIS, N_LAYERS) == [288, 72]  # 576/2 = 288; 288/4 = 72
    assert original.keep_counts(N_VIS, N_LAYERS) == [288, 144]  # 576/4 = 144


def test_ratio_one_keeps_everything():
    assert plan(stage(0, {"ratio": 1.0})).keep_counts(N_VIS, N_LAYERS) == [N_VIS]


@pytest.mark.parametrize(
    ("ratio", "n", "expected"),
    [
        (0.5, 5, 3),  # 2.5 -> 3 (Python's round() would give 2)
        (0.5, 9, 5),  # 4.5 -> 5 (round() would give 4)
        (0.5, 7, 4),  # 3.5 -> 4
        (0.3, 10, 3),  # 3.0
        (0.34, 10, 3),  # 3.4 -> 3
        (0.36, 10, 4),  # 3.6 -> 4
        (0.25, 10, 3),  # 2.5 -> 3
        (0.75, 10, 8),  # 7.5 -> 8
    ],
)
def test_ratio_rounds_half_up(ratio, n, expected):
    assert plan(stage(1, {"ratio": ratio})).keep_counts(n, N_LAYERS) == [expected]


@pytest.mark.parametrize(
    ("ratio", "n", "expected"),
    [
        (0.29, 50, 15),  # 14.5 exactly in decimal; 0.29 * 50 == 14.499999999999998 in binary
        (0.7, 45, 32),  # 31.5; 0.7 * 45 == 31.499999999999996
        (0.35, 90, 32),  # 31.5
        (0.58, 25, 15),  # 14.5
    ],
)
def test_ratio_rounds_decimal_halves_up(ratio, n, expected):
    """A ratio written in decimal rounds half-up as written, not as its binary approximation."""
    assert plan(stage(1, {"ratio": ratio})).keep_counts(n, N_LAYERS) == [expected]


def test_counts_never_drop_below_one():
    # 0.001 * 100 = 0.1 rounds to 0; a stage keeps at least one token
    assert plan(stage(1, {"ratio": 0.001})).keep_counts(100, N_LAYERS) == [1]


def test_counts_clamped_to_tokens_entering_the_stage():
    assert plan(stage(1, 1000)).keep_counts(N_VIS, N_LAYERS) == [N_VIS]
    assert plan(stage(1, N_VIS)).keep_counts(N_VIS, N_LAYERS) == [N_VIS]
    # a later stage asking for more than the previous one kept keeps what is left
    assert plan(stage(1, 100), stage(3, 200)).keep_counts(N_VIS, N_LAYERS) == [100, 100]
    assert plan(stage(1, 100), stage(3, {"ratio": 0.5, "of": "original"})).keep_counts(N_VIS, N_LAYERS) == [100, 100]
    # fewer visual tokens than asked: all of them, no error
    assert plan(stage(1, 64)).keep_counts(10, N_LAYERS) == [10]


def test_no_visual_tokens_gives_zeros():
    p = plan(stage(1, 64), stage(3, {"ratio": 0.5}))
    assert p.keep_counts(0, 4) == [0, 0]
    assert p.visual_per_layer(0, 4) == [0, 0, 0, 0]
    assert p.layer_average_for(0, 4) == 0.0
    weighted = plan(stage(2, {"weight": 1.0}), layer_average={"tokens": 64})
    assert weighted.keep_counts(0, N_LAYERS) == [0]  # not "unreachable": nothing to reduce


def test_empty_plan():
    p = plan()
    assert p.keep_counts(N_VIS, N_LAYERS) == []
    assert p.visual_per_layer(N_VIS, 3) == [N_VIS] * 3
    assert p.layer_average_for(N_VIS, N_LAYERS) == N_VIS


# ============================================================================ per-layer counts


@pytest.mark.parametrize(
    ("keep", "average"),
    [
        # 576 + 9*92 + 5*54 + 17*22 = 576 + 828 + 270 + 374 = 2048 = 64 * 32
        ([92, 54, 22], 64.0),
        # 576 + 9*218 + 5*128 + 17*54 = 576 + 1962 + 640 + 918 = 4096 = 128 * 32
        ([218, 128, 54], 128.0),
    ],
)
def test_pio_schedule_layer_average(keep, average):
    p = plan(*(stage(layer, k) for layer, k in zip([1, 10, 15], keep)))
    assert p.keep_counts(N_VIS, N_LAYERS) == keep
    per_layer = p.visual_per_layer(N_VIS, N_LAYERS)
    assert per_layer == [576] + [keep[0]] * 9 + [keep[1]] * 5 + [keep[2]] * 17
    assert len(per_layer) == N_LAYERS
    assert p.layer_average_for(N_VIS, N_LAYERS) == average


def test_visual_per_layer_with_cut_at_layer_zero():
    p = plan(stage(0, 10), stage(2, 5))
    assert p.visual_per_layer(N_VIS, 4) == [10, 10, 5, 5]
    assert p.layer_average_for(N_VIS, 4) == 7.5


def test_visual_per_layer_cut_at_last_layer():
    p = plan(stage(3, 8))
    assert p.visual_per_layer(16, 4) == [16, 16, 16, 8]
    assert p.layer_average_for(16, 4) == 14.0


# ============================================================================ weights + layer_average


def test_single_weighted_stage_hits_layer_average():
    p = plan(stage(2, {"weight": 1.0}), layer_average={"tokens": 64})
    # the first 2 layers see all 576: k = (64*32 - 2*576) / 30 = 896 / 30 = 29.87 -> 30
    assert p.keep_counts(N_VIS, N_LAYERS) == [30]
    assert p.visual_per_layer(N_VIS, N_LAYERS) == [576, 576] + [30] * 30
    assert p.layer_average_for(N_VIS, N_LAYERS) == (2 * 576 + 30 * 30) / 32  # 64.125


def test_weight_scale_does_not_depend_on_a_common_factor():
    a = plan(stage(2, {"weight": 1.0}), layer_average={"tokens": 64})
    b = plan(stage(2, {"weight": 7.5}), layer_average={"tokens": 64})
    assert a.keep_counts(N_VIS, N_LAYERS) == b.keep_counts(N_VIS, N_LAYERS) == [30]


def test_two_weighted_stages():
    p = plan(stage(2, {"weight": 2.0}), stage(10, {"weight": 1.0}), layer_average={"tokens": 64})
    # s = (64*32 - 2*576) / (8*2 + 22*1) = 896 / 38 = 23.579; k = [47.16 -> 47, 23.58 -> 24]
    assert p.keep_counts(N_VIS, N_LAYERS) == [47, 24]
    assert p.layer_average_for(N_VIS, N_LAYERS) == (2 * 576 + 8 * 47 + 22 * 24) / 32  # 64.25


def test_layer_average_ratio_form():
    p = plan(stage(0, {"weight": 1.0}), layer_average={"ratio": 0.25})
    # target 0.25 * 100 = 25 tokens per layer, every layer reduced: k = 25*32/32 = 25
    assert p.keep_counts(100, N_LAYERS) == [25]
    assert p.layer_average_for(100, N_LAYERS) == 25.0
    # the ratio form scales with the sample: 0.25 * 576 = 144
    assert p.keep_counts(N_VIS, N_LAYERS) == [144]


def test_layer_average_tokens_equal_to_ratio_form():
    by_tokens = plan(stage(2, {"weight": 1.0}), layer_average={"tokens": 64})
    by_ratio = plan(stage(2, {"weight": 1.0}), layer_average={"ratio": 64 / 576})
    assert by_tokens.keep_counts(N_VIS, N_LAYERS) == by_ratio.keep_counts(N_VIS, N_LAYERS) == [30]


def test_weighted_count_clamped_to_current():
    # target as high as the input: s = (576*32 - 0)/32 = 576; a later weight of 2 asks 1152 -> 576
    p = plan(stage(0, {"weight": 1.0}), stage(4, {"weight": 2.0}), layer_average={"tokens": 500})
    counts = p.keep_counts(N_VIS, N_LAYERS)
    assert counts[1] == counts[0]  # clamped to what the first stage kept


def test_unreachable_layer_average_tokens():
    p = plan(stage(2, {"weight": 1.0}), layer_average={"tokens": 10})
    # the first 2 layers alone average 2*576/32 = 36 > 10
    with pytest.raises(PlanError) as info:
        p.keep_counts(N_VIS, N_LAYERS)
    msg = str(info.value)
    assert "unreachable" in msg and "stages.0.layer" in msg and "layer_average" in msg
    assert "36" in msg  # the smallest reachable average


def test_unreachable_layer_average_ratio_fails_at_build():
    # 0.05 * N per layer, but the first 2 of 32 layers already average 2N/32 = 0.0625 N
    spec = {"layer_average": {"ratio": 0.05}, "stages": [stage(2, {"weight": 1.0}, selector="random")]}
    build_plan(spec)  # fine without a depth
    msg = plan_error(spec, n_layers=32)
    assert "unreachable" in msg and "stages.0.layer" in msg
    build_plan(spec, n_layers=64)  # 2N/64 = 0.031 N < 0.05 N: reachable


# ============================================================================ validation errors


@pytest.mark.parametrize("keep", [0, -3, {"tokens": 0}, {"tokens": -1}])
def test_keep_zero_or_negative(keep):
    msg = plan_error({"stages": [stage(1, keep, selector="random")]})
    assert "stages.0.keep" in msg
    assert "greater than or equal to 1" in msg


def test_keep_bool_refused():
    msg = plan_error({"stages": [stage(1, True, selector="random")]})
    assert "stages.0.keep" in msg and "boolean" in msg


@pytest.mark.parametrize(("keep", "suggestion"), [(0.5, "{ratio: 0.5}"), (1.0, "{ratio: 1.0}"), (64.0, "{tokens: 64}")])
def test_float_keep_suggests_a_valid_form(keep, suggestion):
    msg = plan_error({"stages": [stage(1, keep, selector="random")]})
    assert "stages.0.keep" in msg
    assert suggestion in msg
    assert "{ratio: 64.0}" not in msg  # issue 16 item 11: never suggest an invalid ratio


@pytest.mark.parametrize(
    ("ratio", "allowed"), [(0, "greater than 0"), (-0.5, "greater than 0"), (1.5, "less than or equal to 1")]
)
def test_ratio_out_of_range(ratio, allowed):
    msg = plan_error({"stages": [stage(1, {"ratio": ratio}, selector="random")]})
    assert "stages.0.keep.ratio" in msg
    assert allowed in msg


def test_ratio_of_must_be_current_or_original():
    msg = plan_error({"stages": [stage(1, {"ratio": 0.5, "of": "previous"}, selector="random")]})
    assert "stages.0.keep.of" in msg and "'current'" in msg and "'original'" in msg


def test_weight_must_be_positive():
    msg = plan_error({"layer_average": {"tokens": 64}, "stages": [stage(1, {"weight": 0}, selector="random")]})
    assert "stages.0.keep.weight" in msg and "greater than 0" in msg


@pytest.mark.parametrize("layers", [[3, 3], [5, 2]])
def test_layers_must_strictly_increase(layers):
    msg = plan_error({"stages": [stage(layer, 4, selector="random") for layer in layers]})
    assert "strictly increasing" in msg
    assert f"stages.1.layer={layers[1]}" in msg and f"stages.0.layer={layers[0]}" in msg


def test_layers_not_increasing_names_the_offending_pair():
    msg = plan_error({"stages": [stage(layer, 4, selector="random") for layer in [1, 4, 4]]})
    assert "stages.2.layer=4" in msg and "stages.1.layer=4" in msg


def test_negative_layer():
    msg = plan_error({"stages": [stage(-1, 4, selector="random")]})
    assert "stages.0.layer" in msg and "greater than or equal to 0" in msg


def test_unknown_stage_key():
    msg = plan_error({"stages": [{"layr": 1, "keep": 4, "selector": "random"}]})
    assert "stages.0.layr" in msg and "unknown key" in msg
    assert "stages.0.layer" in msg and "required" in msg  # the key that was meant


def test_unknown_stage_key_lists_allowed_keys():
    msg = plan_error({"stages": [{"layer": 1, "keep": 4, "selector": "random", "scorrer": "norm"}]})
    assert "stages.0.scorrer" in msg
    assert all(key in msg for key in ("layer", "keep", "scorer", "selector", "positions"))


def test_unknown_plan_key():
    msg = plan_error({"stage": [], "stages": []})
    assert re.search(
        r"^\s*stage: unknown key .stage.; allowed keys: adapter, description, layer_average, name, positions, stages",
        msg,
        re.M,
    )


def test_bad_position_policy():
    msg = plan_error({"positions": "shift", "stages": [stage(1, 4, selector="random", positions="nope")]})
    assert "positions" in msg and "stages.0.positions" in msg
    assert "'keep'" in msg and "'renumber'" in msg


def test_unknown_selector_lists_known():
    msg = plan_error({"stages": [stage(1, 4, selector="topkk")]})
    assert "'topkk'" in msg and "stages.0.selector.name" in msg
    known = get_registry().names("selector")
    assert {"topk", "random", "uniform"} <= set(known)
    assert ", ".join(known) in msg


def test_unknown_scorer_lists_known():
    msg = plan_error({"stages": [stage(1, 4, scorer={"name": "nrom"}, selector="topk")]})
    assert "'nrom'" in msg and "stages.0.scorer.name" in msg
    assert ", ".join(get_registry().names("scorer")) in msg


def test_unknown_component_setting_key():
    msg = plan_error({"stages": [stage(1, 4, selector={"name": "random", "sed": 1})]})
    assert "stages.0.selector.sed" in msg and "unknown key" in msg


def test_unknown_component_setting_key_lists_allowed():
    msg = plan_error({"stages": [stage(1, 4, selector={"name": "random", "sed": 1})]})
    assert "seed" in msg


def test_bad_component_setting_value():
    msg = plan_error({"stages": [stage(1, 4, selector={"name": "random", "seed": "abc"})]})
    assert "stages.0.selector.seed" in msg and "integer" in msg


def test_component_settings_reach_the_instance():
    compiled = build_plan({"stages": [stage(1, 4, selector={"name": "random", "seed": 7})]})
    assert compiled.stages[0].selector.settings.seed == 7


def test_component_without_name():
    msg = plan_error({"stages": [stage(1, 4, selector={"seed": 1})]})
    assert "stages.0.selector.name" in msg and "required" in msg


def test_topk_without_scorer():
    msg = plan_error({"stages": [stage(1, 4, selector="topk")]})
    assert "stages.0.scorer" in msg and "'topk'" in msg
    for name in ("random", "uniform"):  # the selectors that need no scores
        assert name in msg


def test_default_selector_is_topk():
    msg = plan_error({"stages": [stage(1, 4)]})
    assert "'topk'" in msg and "stages.0.scorer" in msg
    assert build_plan({"stages": [stage(1, 4, scorer="norm")]}).stages[0].spec.selector.name == "topk"


def test_weight_without_layer_average():
    msg = plan_error({"stages": [stage(1, 4, selector="random"), stage(2, {"weight": 1.0}, selector="random")]})
    assert "weight" in msg and "layer_average" in msg
    assert re.search(r"stages(\.| \[)1", msg)


def test_layer_average_with_non_weight_stage():
    msg = plan_error({"layer_average": {"tokens": 64}, "stages": [stage(1, {"weight": 1}), stage(3, 16)]})
    assert "layer_average" in msg and "{weight: w}" in msg
    assert re.search(r"stages(\.| \[)1", msg)


@pytest.mark.parametrize("avg", [{}, {"tokens": 64, "ratio": 0.1}])
def test_layer_average_needs_exactly_one_form(avg):
    msg = plan_error({"layer_average": avg, "stages": [stage(1, {"weight": 1}, selector="random")]})
    assert "layer_average" in msg and "exactly one of 'tokens' or 'ratio'" in msg


def test_layer_average_bad_values():
    msg = plan_error({"layer_average": {"tokens": 0}, "stages": [stage(1, {"weight": 1}, selector="random")]})
    assert "layer_average.tokens" in msg and "greater than 0" in msg
    msg = plan_error({"layer_average": {"ratio": 2}, "stages": [stage(1, {"weight": 1}, selector="random")]})
    assert "layer_average.ratio" in msg and "less than or equal to 1" in msg


def test_cut_layer_out_of_range():
    ok = build_plan({"stages": [stage(3, 4, selector="random")]}, n_layers=4)
    assert ok.n_layers == 4
    msg = plan_error({"stages": [stage(1, 8, selector="random"), stage(4, 4, selector="random")]}, n_layers=4)
    assert "stages.1.layer=4" in msg and "0..3" in msg and "4 decoder layers" in msg


class _HiddenOnlyAdapter:
    provides = Need.HIDDEN


def test_missing_signal_names_adapter_and_signal():
    spec = {"stages": [stage(0, 4, selector="random"), stage(1, 4, selector="uniform")]}
    build_plan(spec, adapter=type("GridAdapter", (), {"provides": Need.HIDDEN | Need.VISUAL_GRID}))
    msg = plan_error(spec, adapter=_HiddenOnlyAdapter)
    assert "stages.1" in msg and "visual_grid" in msg and "_HiddenOnlyAdapter" in msg
    assert "hidden" in msg  # what it provides


def test_plan_must_be_plan_dict_or_name():
    with pytest.raises(PlanError, match="Plan, a mapping or a preset name"):
        build_plan(42)
    with pytest.raises(PlanError, match="known presets"):
        build_plan("no_such_preset")


# ============================================================================ plan given as dict, object, preset


def test_plan_given_as_dict_object_and_preset_name_agree():
    as_dict = {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 0}}]}
    as_object = Plan(stages=[Stage(layer=2, keep=Ratio(ratio=0.5), selector={"name": "random", "seed": 0})])
    compiled = [
        build_plan(as_dict, n_layers=32),
        build_plan(as_object, n_layers=32),
        build_plan("random_50", n_layers=32),
    ]
    for c in compiled:
        assert isinstance(c, CompiledPlan)
        assert [s.layer for s in c.stages] == [2]
        assert type(c.stages[0].selector).__name__ == "RandomSelector"
        assert c.stages[0].scorer is None
        assert c.keep_counts(N_VIS) == [288]
    assert compiled[1].plan is as_object
    assert compiled[2].plan.name == "random_50"
    assert parse_plan(as_dict) == as_object


def test_plan_object_with_typed_budgets():
    p = Plan(
        layer_average=LayerAverage(tokens=64),
        stages=[Stage(layer=2, keep=Weight(weight=1.0), selector="random")],
    )
    assert p.keep_counts(N_VIS, N_LAYERS) == [30]
    with pytest.raises(ValueError):
        Plan(stages=[Stage(layer=2, keep=Weight(weight=1.0), selector="random")])


def test_position_policy_per_stage_overrides_plan():
    p = plan(stage(1, 4), stage(2, 2, positions="renumber"), positions="keep")
    assert [p.policy(0), p.policy(1)] == ["keep", "renumber"]
    compiled = build_plan(
        {
            "positions": "renumber",
            "stages": [stage(1, 4, selector="random"), stage(2, 2, selector="random", positions="keep")],
        }
    )
    assert [s.policy for s in compiled.stages] == ["renumber", "keep"]


def test_compiled_stage_needs():
    compiled = build_plan({"stages": [stage(1, 8, selector="uniform"), stage(2, 4, scorer="norm", selector="topk")]})
    assert compiled.stages[0].needs == Need.HIDDEN | Need.VISUAL_GRID
    assert compiled.stages[1].needs == Need.HIDDEN


def test_plan_is_frozen():
    p = plan(stage(1, 4))
    with pytest.raises(ValueError):
        p.positions = "renumber"


def test_public_api_exports():
    assert tokenreduce.build_plan is build_plan and tokenreduce.PlanError is PlanError
    assert issubclass(PlanError, ValueError) and issubclass(PlanError, tokenreduce.TokenReduceError)
