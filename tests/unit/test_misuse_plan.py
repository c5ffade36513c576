"""Plans and presets under misuse (issue 16, items 3 and 11, and the bad-value family): preset names
inside a user's Hydra application and from threads, messages that say what is wrong, and every public
plan / registry entry point given bad values refuses them with an error that names the field."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.version import getbase
from pydantic import ValidationError

import tokenreduce
from tokenreduce import Plan, PlanError, Stage, TokenReduceError, UnsupportedModelError, build_plan
from tokenreduce.core.conf import compose, compose_with_choices
from tokenreduce.core.errors import UnknownComponentError
from tokenreduce.core.plan import parse_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.registry import get_registry, list_components
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"


@pytest.fixture(scope="module")
def model():
    return build_tiny("llava")  # 16 visual tokens per image, 4 decoder layers


@pytest.fixture(scope="module")
def inputs():
    return make_inputs("llava", [PROMPT])


@pytest.fixture(scope="module")
def vanilla(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def hooks(model) -> int:
    lm = model.model.language_model
    return len(model._forward_pre_hooks) + sum(len(m._forward_pre_hooks) for m in [lm, *lm.layers])


def assert_untouched(model, inputs, vanilla):
    assert hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, vanilla)


def plan_error(spec, **kw) -> str:
    with pytest.raises(PlanError) as info:
        build_plan(spec, **kw)
    return str(info.value)


# ================================================================ item 3: presets without global state
@pytest.fixture
def user_conf(tmp_path):
    """A user's own Hydra config folder."""
    (tmp_path / "config.yaml").write_text("learning_rate: 0.1\n")
    return str(tmp_path)


def test_preset_name_inside_a_users_hydra_app(model, inputs, user_conf):
    # before: ValueError: GlobalHydra is already initialized
    with initialize_config_dir(config_dir=user_conf, version_base="1.3"):
        with torch.no_grad(), tokenreduce.apply(model, "random_50") as att:
            model(**inputs)
        assert att.trace.stages[0].visual_after == [8]
        assert load_preset("pio_64").name == "pio_64"
        # the user's Hydra is still theirs, with their config and version base
        assert GlobalHydra.instance().is_initialized()
        assert hydra_compose(config_name="config") == {"learning_rate": 0.1}
        assert str(getbase()) == "1.3"
    assert not GlobalHydra.instance().is_initialized()


def test_compose_leaves_no_global_state():
    base = getbase()
    data, choices = compose_with_choices(["plan=random_50", "model=tiny_llava"])
    assert data["plan"]["stages"][0]["keep"] == {"ratio": 0.5}
    assert choices["plan"] == "random_50" and choices["model"] == "tiny_llava"
    assert "hydra" not in data
    assert not GlobalHydra.instance().is_initialized()
    assert getbase() is base  # not even Hydra's version base is left changed


def test_presets_from_eight_threads():
    # before: all but one thread raised "GlobalHydra is already initialized"
    names = ["random_50", "pio_64", "fastv_64", "dart_64", "keep_all", "uniform_25", "visionzip_64", "sparsevlm_64"]
    expected = {name: load_preset(name) for name in names}
    got: dict[str, Plan] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(names))

    def work(name):
        try:
            start.wait()
            got[name] = load_preset(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == expected


def test_separate_models_in_threads(inputs):
    kept: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            m = build_tiny("llava")
            with torch.no_grad(), tokenreduce.apply(m, "random_50") as att:
                m(**inputs)
            kept[i] = att.trace.stages[0].visual_after
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert kept == {0: [8], 1: [8], 2: [8]}


def test_compose_errors_name_the_override():
    with pytest.raises(PlanError, match=r"could not compose config with overrides \['plan=nope'\]"):
        compose(["plan=nope"])
    with pytest.raises(PlanError, match="plan.stages.0.kep"):
        compose(["plan=random_50", "plan.stages.0.kep=3"])


# ================================================================ item 11: messages
@pytest.mark.parametrize(("value", "what"), [(math.nan, "not a number"), (math.inf, "infinite")])
def test_ratio_nan_or_inf_says_so(value, what):
    # before: "should be less than or equal to 1 (got nan)"
    msg = plan_error({"stages": [{"layer": 1, "keep": {"ratio": value}, "selector": "random"}]})
    assert "stages.0.keep.ratio" in msg and what in msg and "finite number" in msg
    assert "less than or equal" not in msg


def test_ratio_nan_from_an_override():
    with pytest.raises(PlanError) as info:
        load_preset("random_50", overrides=["plan.stages.0.keep.ratio=nan"])
    msg = str(info.value)
    assert "plan.stages.0.keep.ratio" in msg and "not a number" in msg


@pytest.mark.parametrize(
    ("field", "spec"),
    [
        (
            "stages.0.keep.weight",
            {"layer_average": {"tokens": 4}, "stages": [{"layer": 1, "keep": {"weight": math.nan}}]},
        ),
        (
            "layer_average.tokens",
            {"layer_average": {"tokens": math.inf}, "stages": [{"layer": 1, "keep": {"weight": 1}}]},
        ),
        (
            "layer_average.ratio",
            {"layer_average": {"ratio": math.nan}, "stages": [{"layer": 1, "keep": {"weight": 1}}]},
        ),
    ],
)
def test_other_non_finite_numbers_are_named(field, spec):
    for st in spec["stages"]:
        st["selector"] = "random"
    msg = plan_error(spec)
    assert field in msg and "finite number" in msg


@pytest.mark.parametrize(
    ("keep", "says", "never"),
    [
        (4.0, "{tokens: 4}", "{ratio: 4.0}"),  # before: "write {ratio: 4.0}", itself invalid
        (64.0, "{tokens: 64}", "{ratio: 64.0}"),
        (0.25, "{ratio: 0.25}", "{tokens"),
        (1.0, "{ratio: 1.0}", "{ratio: 1.0} or an integer"),
        (4.5, "{ratio: r} with 0 < r <= 1", "{ratio: 4.5}"),
        (-2.0, "must be positive", "{ratio: -2.0}"),
        (math.nan, "not a number", "{ratio: nan}"),
        (math.inf, "infinite", "{ratio: inf}"),
    ],
)
def test_float_keep_suggests_a_valid_form(keep, says, never):
    msg = plan_error({"stages": [{"layer": 1, "keep": keep, "selector": "random"}]})
    assert "stages.0.keep" in msg and says in msg and never not in msg


def test_unreachable_ratio_target_cites_no_hypothetical_count():
    # before: "... already see 1000 visual tokens each ..." for a model whose count is unknown here
    spec = {"layer_average": {"ratio": 0.05}, "stages": [{"layer": 2, "keep": {"weight": 1}, "selector": "random"}]}
    msg = plan_error(spec, n_layers=32)
    assert "1000" not in msg
    assert "layer_average {ratio: 0.05} is unreachable" in msg and "2 of 32 layers" in msg
    assert "0.0625" in msg and "stages.0.layer" in msg  # the smallest reachable ratio, and the fix


def test_unreachable_token_target_cites_the_models_count(model, inputs, vanilla):
    # tiny LLaVA: 16 visual tokens, 4 layers; cutting at layer 2 the average is at least 2*16/4 = 8
    plan = {"layer_average": {"tokens": 4}, "stages": [{"layer": 2, "keep": {"weight": 1}, "selector": "random"}]}
    with pytest.raises(PlanError) as info:
        with torch.no_grad(), tokenreduce.apply(model, plan):
            model(**inputs)
    msg = str(info.value)
    assert "1000" not in msg
    assert "a sample with 16 visual tokens" in msg and "at least 8 per layer" in msg
    assert_untouched(model, inputs, vanilla)


# ================================================================ bad values at every public entry point
@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ([1, 2], "a plan must be a Plan, a mapping or a preset name; got list"),
        (42, "got int"),
        (None, "got NoneType"),
        ("no_such_preset", "unknown plan preset 'no_such_preset'; known presets:"),
        ({"stages": "layer 1"}, "stages:"),
        ({"stagez": []}, "unknown key 'stagez'; allowed keys:"),
        ({"positions": "shuffle", "stages": []}, "positions:"),
        ({"stages": [{"keep": 4}]}, "stages.0.layer: Field required"),
        ({"stages": [{"layer": -1, "keep": 4}]}, "stages.0.layer: Input should be greater than or equal to 0"),
        ({"stages": [{"layer": "two", "keep": 4}]}, "stages.0.layer"),
        ({"stages": [{"layer": 1}]}, "stages.0.keep: Field required"),
        ({"stages": [{"layer": 1, "keep": True}]}, "stages.0.keep"),
        ({"stages": [{"layer": 1, "keep": 0}]}, "stages.0.keep.tokens"),
        ({"stages": [{"layer": 1, "keep": {"toknes": 4}}]}, "stages.0.keep"),
        ({"stages": [{"layer": 1, "keep": {"ratio": 0.5, "of": "previous"}}]}, "stages.0.keep.of"),
        ({"stages": [{"layer": 1, "keep": {"ratio": 1.5}}]}, "stages.0.keep.ratio"),
        ({"stages": [{"layer": 1, "keep": {"weight": 1}}]}, "needs plan.layer_average"),
        ({"layer_average": {"tokens": 8}, "stages": [{"layer": 1, "keep": 4}]}, "every stage's keep must be"),
        ({"layer_average": {}, "stages": [{"layer": 1, "keep": {"weight": 1}}]}, "layer_average"),
        ({"stages": [{"layer": 2, "keep": 8}, {"layer": 2, "keep": 4}]}, "stages.1.layer=2"),
        ({"stages": [{"layer": 1, "keep": 4, "selector": "topkk"}]}, "unknown selector 'topkk' (at stages.0.selector"),
        ({"stages": [{"layer": 1, "keep": 4, "scorer": "nrom"}]}, "unknown scorer 'nrom' (at stages.0.scorer"),
        ({"stages": [{"layer": 1, "keep": 4, "selector": {"name": "random", "sed": 1}}]}, "stages.0.selector.sed"),
        ({"stages": [{"layer": 1, "keep": 4, "selector": {"seed": 1}}]}, "stages.0.selector.name"),
        ({"stages": [{"layer": 1, "keep": 4, "selector": "topk"}]}, "stages.0.selector: 'topk' ranks by scores"),
        ({"stages": [{"layer": 1, "keep": 4, "positions": "shift"}]}, "stages.0.positions"),
    ],
)
def test_build_plan_refuses_bad_values_naming_the_field(spec, named):
    if isinstance(spec, dict):
        for st in spec.get("stages", []) if isinstance(spec.get("stages"), list) else []:
            st.setdefault("selector", "random")
    msg = plan_error(spec)
    assert named in msg


def test_build_plan_refuses_a_cut_layer_the_model_does_not_have():
    msg = plan_error({"stages": [{"layer": 4, "keep": 4, "selector": "random"}]}, n_layers=4)
    assert "stages.0.layer=4 is out of range" in msg and "0..3" in msg


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Stage(layer=-1, keep=4), "layer"),
        (lambda: Stage(layer=1, keep=4.0), "keep"),
        (lambda: Stage(layer=1, keep={"ratio": math.nan}), "ratio"),
        (lambda: Stage(layer=1, keep=4, scorer=object()), "scorer"),
        (lambda: Stage(layer=1, keep=4, selector=tokenreduce.strategies.NormScorer()), "selector"),
        (lambda: Stage(layer=1, keep=4, colour="red"), "colour"),
        (lambda: Plan(stages=[Stage(layer=2, keep=8), Stage(layer=1, keep=4)]), "stages.1.layer"),
        (lambda: Plan(positions="sideways"), "positions"),
    ],
)
def test_plan_and_stage_construction_refuse_bad_values(build, field):
    with pytest.raises(ValidationError) as info:  # pydantic's, a ValueError
        build()
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("plan", "named"),
    [
        ({"stages": [{"layer": 7, "keep": 4, "selector": "random"}]}, "stages.0.layer=7 is out of range"),
        ({"stages": [{"layer": 1, "keep": 4.0, "selector": "random"}]}, "{tokens: 4}"),
        ({"stages": [{"layer": 1, "keep": 4, "selector": "nope"}]}, "unknown selector 'nope'"),
        (
            {"stages": [{"layer": 1, "keep": 4, "selector": "random"}], "adapter": {"colour": 1}},
            "adapter: the LlavaAdapter adapter takes no options; got ['colour']",
        ),
        ("no_such_preset", "unknown plan preset 'no_such_preset'"),
        (3.5, "a plan must be a Plan, a mapping or a preset name; got float"),
    ],
)
def test_apply_refuses_bad_plans_and_leaves_the_model_untouched(model, inputs, vanilla, plan, named):
    with pytest.raises(PlanError) as info:
        tokenreduce.apply(model, plan)
    assert named in str(info.value)
    assert_untouched(model, inputs, vanilla)


def test_load_preset_refuses_bad_overrides():
    with pytest.raises(PlanError, match=r"(?s)preset 'random_50'.*plan\.stages\.0\.layer"):
        load_preset("random_50", overrides=["plan.stages.0.layer=-3"])
    with pytest.raises(PlanError, match=r"unknown plan preset 'random50'"):
        load_preset("random50")


@pytest.mark.parametrize("kind", ["bogus", "scorers", "", None])
def test_list_components_refuses_an_unknown_kind(kind):
    if kind is None:
        assert list_components(None)  # None: every kind
        return
    with pytest.raises(UnknownComponentError) as info:
        list_components(kind=kind)
    msg = str(info.value)
    assert f"kind={kind!r}" in msg and "allowed: scorer, selector, adapter, architecture" in msg


def test_registry_lookups_refuse_bad_names_and_kinds():
    registry = get_registry()
    with pytest.raises(UnknownComponentError, match=r"unknown scorer 'nrom' \(at here\); known scorers: .*norm"):
        registry.get("scorer", "nrom", context="here")
    for call in (
        lambda: registry.get("scorers", "norm"),
        lambda: registry.names("selectr"),
        lambda: registry.components("adaptor"),
    ):
        with pytest.raises(UnknownComponentError, match="unknown component kind"):
            call()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' has no registered architecture.*llava"):
        registry.spec_for("gpt2")
    assert registry.adapter_for("gpt2") is None


def test_every_error_here_is_a_tokenreduce_error():
    for exc in (PlanError, UnknownComponentError, UnsupportedModelError):
        assert issubclass(exc, TokenReduceError)
    with pytest.raises(TokenReduceError):
        parse_plan(object())  # type: ignore[arg-type]
