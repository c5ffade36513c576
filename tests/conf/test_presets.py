"""Hydra presets in conf/: every preset composes and builds; overrides are validated with paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tokenreduce
from tokenreduce import Plan, PlanError, TokenReduceError, build_plan
from tokenreduce.core.presets import compose, conf_dir, load_preset, preset_names
from tokenreduce.core.registry import get_registry

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
BASE_PRESETS = {"demo", "keep_all", "random_50", "uniform_25"}


def test_conf_dir_finds_config_yaml():
    d = conf_dir()
    assert (d / "config.yaml").is_file()
    assert (d / "plan").is_dir() and (d / "model").is_dir()
    assert d.resolve() == REPO_CONF.resolve()  # in a checkout: the top-level conf/


def test_preset_names_match_the_files():
    names = preset_names()
    assert names == sorted(p.stem for p in (REPO_CONF / "plan").glob("*.yaml"))
    assert BASE_PRESETS <= set(names)
    assert "tiny_llava" in preset_names("model")


def _unregistered(plan: Plan) -> list[str]:
    reg = get_registry()
    missing = []
    for i, st in enumerate(plan.stages):
        for kind, ref in (("scorer", st.scorer), ("selector", st.selector)):
            if ref is not None and ref.name not in reg.names(kind):
                missing.append(f"stages.{i}.{kind}={ref.name}")
    return missing


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_composes_and_builds(name):
    plan = load_preset(name)
    assert isinstance(plan, Plan)
    assert plan.name == name
    assert plan.stages, f"preset {name} has no stages"
    # the raw YAML stays in the registry-name style: no Hydra `_target_` class paths
    assert "_target_" not in (REPO_CONF / "plan" / f"{name}.yaml").read_text()
    missing = _unregistered(plan)
    assert not missing, f"preset {name} names unregistered components: {', '.join(missing)}"
    compiled = build_plan(name, n_layers=32)
    assert compiled.plan == plan
    assert len(compiled.stages) == len(plan.stages)
    counts = compiled.keep_counts(576)
    assert all(1 <= k <= 576 for k in counts)
    assert counts == sorted(counts, reverse=True)  # a later stage never keeps more


def test_demo_preset_matches_its_yaml():
    raw = yaml.safe_load((REPO_CONF / "plan" / "demo.yaml").read_text())
    plan = load_preset("demo")
    assert [s.layer for s in plan.stages] == [st["layer"] for st in raw["stages"]]
    assert [s.selector.name for s in plan.stages] == [
        st["selector"] if isinstance(st["selector"], str) else st["selector"]["name"] for st in raw["stages"]
    ]
    assert plan.description == raw["description"]


def test_compose_default_config():
    cfg = compose()
    assert isinstance(cfg, dict) and isinstance(cfg["plan"], dict)  # plain containers
    assert cfg["model"]["kind"] == "pretrained" and cfg["model"]["name"] == "easyvqa-llava"  # the shipped reference
    assert cfg["suite"]["plans"] and cfg["task"]["n"] == 1000  # the main job: eval's default suite and subset
    assert Plan.model_validate(cfg["plan"]).stages[0].selector.name == "uniform"  # plan: demo


def test_override_changes_the_budget():
    plan = load_preset("random_50", overrides=["plan.stages.0.keep.ratio=0.25"])
    assert plan.stages[0].keep.ratio == 0.25
    assert plan.keep_counts(576, 32) == [144]
    assert load_preset("random_50").keep_counts(576, 32) == [288]  # the preset itself is unchanged


def test_override_component_setting_and_layer():
    plan = load_preset("random_50", overrides=["plan.stages.0.selector.seed=7", "plan.stages.0.layer=3"])
    assert plan.stages[0].selector.settings == {"seed": 7}
    assert plan.stages[0].layer == 3
    assert build_plan(plan, n_layers=32).stages[0].selector.settings.seed == 7


def test_bad_override_key_names_the_key():
    with pytest.raises(PlanError) as info:
        load_preset("random_50", overrides=["plan.stages.0.keep.rato=0.25"])
    assert "plan.stages.0.keep.rato" in str(info.value)


def test_appended_unknown_key_fails_validation_with_path():
    # `+key=value` gets past Hydra's struct check; pydantic then refuses it, naming the path
    with pytest.raises(PlanError) as info:
        load_preset("random_50", overrides=["+plan.stages.0.layr=1"])
    msg = str(info.value)
    assert "random_50" in msg and "plan.stages.0.layr" in msg and "unknown key" in msg


def test_appended_unknown_component_setting_fails_at_build():
    # component settings are checked against the registered Settings model when the plan is built
    plan = load_preset("random_50", overrides=["+plan.stages.0.selector.sed=1"])
    with pytest.raises(PlanError) as info:
        build_plan(plan)
    assert "stages.0.selector.sed" in str(info.value)


def test_bad_override_value_names_the_path():
    with pytest.raises(PlanError) as info:
        load_preset("random_50", overrides=["plan.stages.0.keep.ratio=2"])
    msg = str(info.value)
    assert "plan.stages.0.keep.ratio" in msg and "less than or equal to 1" in msg


def test_unknown_component_in_override_lists_known():
    plan = load_preset("random_50", overrides=["plan.stages.0.selector.name=randum", "~plan.stages.0.selector.seed"])
    with pytest.raises(PlanError) as info:
        build_plan(plan)
    assert "'randum'" in str(info.value) and "random" in str(info.value) and "topk" in str(info.value)


def test_unknown_preset_lists_known_presets():
    with pytest.raises(PlanError) as info:
        load_preset("random_5O")
    msg = str(info.value)
    assert "'random_5O'" in msg
    for name in preset_names():
        assert name in msg


def test_preset_name_through_the_public_api():
    assert tokenreduce.build_plan("uniform_25", n_layers=32).keep_counts(576) == [144]


# -- the budget presets and the registry as a whole ---------------------------------------------------
def _budget(name: str) -> int | None:
    """The layer-average budget a preset's name announces (``<method>_<64|128|192>``), else None."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail in {"64", "128", "192"} else None


BUDGET_PRESETS = [n for n in preset_names() if _budget(n) is not None]


def test_every_method_has_the_three_budget_presets():
    methods = {n.rsplit("_", 1)[0] for n in BUDGET_PRESETS}
    assert {"fastv", "pio", "pdrop", "sparsevlm", "dart", "divprune"} <= methods
    for m in methods:
        assert {f"{m}_{b}" for b in (64, 128, 192)} <= set(BUDGET_PRESETS), m


@pytest.mark.parametrize("name", BUDGET_PRESETS)
def test_budget_preset_hits_its_layer_average_on_llava_1_5(name):
    """LLaVA-1.5-7B: 576 visual tokens, 32 decoder layers; within one token of the name's budget,
    and a YAML header that derives it."""
    plan = load_preset(name)
    average = plan.layer_average_for(576, 32)
    assert abs(average - _budget(name)) <= 1.0, f"{name}: layer average {average}"
    header = [line for line in (REPO_CONF / "plan" / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 3, f"{name}: the YAML header must derive the budget"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_against_an_architecture(name):
    """Signals each stage needs are provided by at least one registered architecture (LLaVA for
    most; the Qwen presets that read received attention need a Qwen tower), cut layers fit a
    32-layer model, settings validate."""
    plan = load_preset(name)
    errors = []
    for spec in get_registry().specs():
        try:
            compiled = build_plan(plan, n_layers=32, adapter=spec.adapter)
            break
        except TokenReduceError as exc:
            errors.append(f"{spec.model_type}: {exc}")
    else:
        pytest.fail(f"{name} builds against no registered architecture: {errors}")
    for cs in compiled.stages:
        for part, ref in (("scorer", cs.spec.scorer), ("selector", cs.spec.selector)):
            if ref is not None:  # the built component carries the preset's settings
                comp = getattr(cs, part)
                assert comp.settings.model_dump(include=set(ref.settings)) == ref.settings


def test_every_builtin_strategy_is_used_by_a_preset():
    stages = [s for n in preset_names() for s in load_preset(n).stages]
    used = {("scorer", s.scorer.name) for s in stages if s.scorer} | {("selector", s.selector.name) for s in stages}
    builtin = {
        (c.kind, c.name)
        for c in get_registry().components()
        if c.kind in ("scorer", "selector") and c.origin.startswith("builtin:")
    }
    assert builtin <= used, f"built-in strategies without a preset: {sorted(builtin - used)}"
