"""The reference-model presets (conf/plan/ref_*.yaml) and the main job's suite (conf/suite)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from script_modules import load_script

from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import conf_dir, load_preset, preset_names
from tokenreduce.core.registry import get_registry

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"33": 48, "22": 32, "11": 16}  # layer average of 144 visual tokens: 33.3 / 22.2 / 11.1 %
REF = [n for n in preset_names("plan") if n.startswith(("ref_", "qwen_ref_"))]
# components that are building blocks, not methods of their own
GENERIC = {"topk", "nms", "norm"}


def _generator():
    return load_script("scripts/reference_presets.py")


def _suite() -> dict:
    return yaml.safe_load((conf_dir() / "suite" / "reference.yaml").read_text())


def test_the_files_are_what_the_generator_writes(capsys):
    assert _generator().main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("name", REF)
def test_layer_average_meets_the_budget_exactly(name):
    plan = load_preset(name)
    target = TARGETS[name.rsplit("_", 1)[1]]
    assert plan.layer_average_for(144, 4) == target
    assert plan.positions == "keep"
    build_plan(plan, n_layers=4)  # every stage is valid on a 4-layer decoder


def test_generator_arithmetic_matches_the_plan_arithmetic():
    gen = _generator()
    for preset in gen.presets():
        plan = load_preset(preset.name)
        stages = list(zip([s.layer for s in plan.stages], plan.keep_counts(144, 4)))
        assert gen.layer_average(stages) == plan.layer_average_for(144, 4)


def test_split_by_weights_spends_the_budget_exactly():
    gen = _generator()
    assert gen.split_by_weights([1, 1, 1], [92, 54, 22], 48) == [26, 16, 6]
    keeps = gen.split_by_weights([1, 1, 2], [92, 54, 22], 128)
    assert keeps[0] + keeps[1] + 2 * keeps[2] == 128


def test_the_suite_is_every_method_at_three_budgets():
    suite = _suite()
    assert suite["plans"] == [p for b in ("33", "22", "11") for p in suite["plans"] if p.endswith(f"_{b}")]
    assert set(suite["plans"]) == set(REF)
    used = set()
    for name in suite["plans"]:
        for stage in load_preset(name).stages:
            if stage.scorer is not None:
                used.add(stage.scorer.name)
            used.add(stage.selector.name)
    methods = {
        c.name
        for c in get_registry().components()
        if c.kind in ("scorer", "selector") and c.origin.startswith("builtin")
    } - GENERIC
    assert methods and methods <= used, f"registered strategies missing from the suite: {sorted(methods - used)}"
