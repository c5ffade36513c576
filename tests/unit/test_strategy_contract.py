"""The strategy contract (``tokenreduce.core.strategy``): base classes with declared hooks, classes
without a base served with the defaults, components as plan entries, costs declared in the class.

What every registered component must do at run time is checked in ``tests/contract``.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from tokenreduce.core import plan as plan_mod
from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import ComponentRef, Plan, Ratio, Stage, build_plan, parse_plan
from tokenreduce.core.registry import Registry, hookimpl, make_plugin_manager
from tokenreduce.core.strategy import HOOKS, Scorer, Selector, hook
from tokenreduce.core.types import Need, Selection
from tokenreduce.measure.flops import account
from tokenreduce.strategies import NMS, PIO, FastV, FastVScorer, PDrop, PDropScorer, PIOScorer, TopK
from tokenreduce.testing.tiny import llava_config


# -- components of a test plugin ------------------------------------------------------------------
class OldStyleScorer:
    """A scorer written without a base class: Settings, __init__(settings), score; no hooks."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sign: float = 1.0

    def __init__(self, settings):
        self.settings = settings

    def score(self, view):
        return self.settings.sign * view.visual_hidden().float().sum(-1)


class OldStyleSelector:
    """A selector without a base class and without needs_scores."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, settings):
        self.settings = settings

    def select(self, view, scores, keep):
        return Selection.from_lists([list(range(k)) for k in keep.tolist()], device=view.hidden.device)


class CountedScorer(Scorer):
    """A plugin scorer that declares its cost in its class."""

    flops: int = 1000

    def score(self, view):
        return view.visual_hidden().float().norm(dim=-1)

    def cost(self, c: StageCostInput) -> Cost:
        return Cost(self.flops * c.visual_before, 2.0 * c.visual_before, f"{c.name}: {self.flops} per token")


class VisionOldStyle(OldStyleScorer):
    needs = Need.VISION_CLS_ATTENTION


def _registry() -> Registry:
    plugin = types.ModuleType("contract_unit_plugin")

    @hookimpl
    def tokenreduce_register(registry):
        registry.scorer("old_style", OldStyleScorer)
        registry.selector("old_select", OldStyleSelector)
        registry.scorer("counted", CountedScorer)

    plugin.tokenreduce_register = tokenreduce_register
    pm = make_plugin_manager(entry_points=False)
    pm.register(plugin, name="test:contract_unit")
    return Registry.from_plugin_manager(pm)


REGISTRY = _registry()


# -- hooks and their defaults --------------------------------------------------------------------
def test_hook_defaults_for_classes_without_a_base():
    scorer = OldStyleScorer(OldStyleScorer.Settings())
    assert hook(scorer, "needs") == Need.NONE
    assert hook(scorer, "check_stage")(0, 4) is None
    assert tuple(hook(scorer, "vision_layers")()) == ()
    cost = hook(scorer, "cost")(None)
    assert cost.true is None and "no cost model" in cost.note
    assert hook(OldStyleSelector, "needs_scores") is False
    assert hook(VisionOldStyle(VisionOldStyle.Settings()), "vision_layers")() is None  # reads vision: every layer
    with pytest.raises(ValueError, match="unknown hook"):
        hook(scorer, "scores")


def test_base_classes_declare_every_hook_with_its_default():
    for name in HOOKS:
        assert hasattr(Selector, name), name
    assert Scorer.needs == Selector.needs == Need.NONE and Selector.needs_scores is False
    assert TopK().check_stage(0, 4) is None and tuple(TopK().vision_layers()) == ()
    assert PIOScorer.Settings is PIOScorer  # the component is its own settings model


def test_old_style_components_build_run_and_are_not_counted():
    compiled = build_plan(
        {"stages": [{"layer": 1, "keep": 4, "scorer": "old_style", "selector": "old_select"}]},
        n_layers=2,
        registry=REGISTRY,
    )
    assert isinstance(compiled.stages[0].scorer, OldStyleScorer)
    assert compiled.stages[0].needs == Need.HIDDEN and compiled.stages[0].vision_layers() == set()
    acc = account(llava_config(text_layers=2), compiled, n_visual=16, n_text=10)
    assert acc.scorer_flops_true == 0
    assert any("'old_style': not counted (no cost model" in u for u in acc.uncounted)


def test_cost_declared_in_the_class_is_counted():
    compiled = build_plan(
        {"stages": [{"layer": 1, "keep": 4, "scorer": {"name": "counted", "flops": 7}, "selector": "topk"}]},
        n_layers=2,
        registry=REGISTRY,
    )
    acc = account(llava_config(text_layers=2), compiled, n_visual=16, n_text=10)
    assert acc.scorer_flops_true == 7 * 16 and acc.scorer_flops_paper == 32.0
    assert "counted: 7 per token" in acc.stages[0].detail


def test_constructors():
    assert PIOScorer(PIOScorer.Settings(loss_positions=2)) == PIOScorer(loss_positions=2)  # the form without a base
    assert PIOScorer({"loss_positions": 2}, probe="exact") == PIOScorer(loss_positions=2, probe="exact")
    assert PIOScorer(loss_positions=2).settings.loss_positions == 2
    with pytest.raises(ValidationError, match="lambda_"):
        PIOScorer(lambda_=1)


# -- FastV and PDrop: one scorer -----------------------------------------------------------------
def test_fastv_and_pdrop_share_one_scorer():
    assert issubclass(PDropScorer, FastVScorer)
    for name in ("score", "check_stage", "cost"):
        assert getattr(PDropScorer, name) is getattr(FastVScorer, name)
    assert (FastVScorer().layer_offset, PDropScorer().layer_offset) == (-1, 0)
    assert "layer >= 1" in PDropScorer(layer_offset=-1).check_stage(0, 32)
    assert FastVScorer(layer_offset=0).check_stage(0, 32) is None


# -- components in typed plans -------------------------------------------------------------------
def test_typed_stage_equals_its_dict_form_and_serializes_to_names():
    typed = Plan(
        stages=[Stage(layer=2, keep=Ratio(ratio=0.25), scorer=PIO(loss_positions=4), selector=NMS(threshold=0.7))]
    )
    as_dict = {
        "stages": [
            {
                "layer": 2,
                "keep": {"ratio": 0.25},
                "scorer": {"name": "pio", "loss_positions": 4},
                "selector": {"name": "nms", "threshold": 0.7},
            }
        ]
    }
    assert typed == parse_plan(as_dict)
    dumped = typed.model_dump()
    assert dumped["stages"][0]["scorer"] == {"name": "pio", "loss_positions": 4}
    assert dumped["stages"][0]["selector"] == {"name": "nms", "threshold": 0.7}
    assert Plan.model_validate(dumped) == typed
    compiled = build_plan(typed, n_layers=32)
    assert compiled.stages[0].scorer == PIO(loss_positions=4) and compiled.stages[0].selector.threshold == 0.7


def test_other_component_forms():
    st = Stage(layer=2, keep=4, scorer=PDrop(), selector=TopK)  # an object with defaults; a class
    assert (st.scorer, st.selector) == (ComponentRef(name="pdrop"), ComponentRef(name="topk"))
    assert Stage(layer=2, keep=4, scorer=FastV(layer_offset=0)).scorer.settings == {"layer_offset": 0}
    assert ComponentRef.model_validate(NMS(threshold=0.9)) == ComponentRef(name="nms", threshold=0.9)
    built = build_plan(Plan(stages=[st]), n_layers=32)
    assert type(built.stages[0].scorer) is PDropScorer and built.stages[0].scorer.layer_offset == 0


def test_unregistered_or_misplaced_components_are_refused():
    with pytest.raises(ValidationError, match="is not registered"):
        Stage(layer=2, keep=4, scorer=CountedScorer())
    with pytest.raises(PlanError, match=r"stages\.0\.selector.*registered scorer \('pio'\), not a selector"):
        parse_plan({"stages": [{"layer": 2, "keep": 4, "scorer": "norm", "selector": PIO()}]})


def test_old_style_objects_and_settings_in_typed_plans(monkeypatch):
    monkeypatch.setattr(plan_mod, "get_registry", lambda: REGISTRY)
    scorer = OldStyleScorer(OldStyleScorer.Settings(sign=-1.0))
    assert Stage(layer=1, keep=4, scorer=scorer).scorer == ComponentRef(name="old_style", sign=-1.0)
    assert Stage(layer=1, keep=4, scorer=OldStyleScorer.Settings(sign=2.0)).scorer.settings == {"sign": 2.0}


def test_compiled_stage_vision_layers_union():
    compiled = build_plan(
        {"stages": [{"layer": 0, "keep": 8, "scorer": {"name": "vision_cls", "layer": -1}, "selector": "visionzip"}]},
        n_layers=4,
    )
    assert compiled.stages[0].vision_layers() == {-1, -2}


def test_needs_scores_and_score_free_selectors():
    with pytest.raises(PlanError, match="random, uniform"):
        build_plan({"stages": [{"layer": 1, "keep": 4, "selector": NMS()}]})
    assert build_plan({"stages": [{"layer": 1, "keep": 4, "selector": "old_select"}]}, registry=REGISTRY).stages


# -- no import cycle in core ---------------------------------------------------------------------
def _core_imports(path: Path) -> set[str]:
    """Modules of ``tokenreduce.core`` that ``path`` imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
        elif node.module and node.module.startswith("tokenreduce.core."):
            out.add(node.module.split(".")[2])
    return out


def test_core_has_no_import_cycle():
    core = Path(plan_mod.__file__).parent
    graph = {p.stem: _core_imports(p) for p in core.glob("*.py")}

    def visit(mod, stack):
        assert mod not in stack, "import cycle: " + " -> ".join([*stack, mod])
        for dep in graph.get(mod, ()):
            visit(dep, [*stack, mod])

    for mod in graph:
        visit(mod, [])


def test_scores_of_an_old_style_scorer_are_used(monkeypatch):
    """A class without a base runs inside a plan like any other (score is called, hooks defaulted)."""
    import tokenreduce
    from tokenreduce.testing.tiny import build_tiny, make_inputs

    model = build_tiny("llava", text_layers=2)
    inputs = make_inputs("llava", ["USER: <image> what color is the shape? ASSISTANT:"])
    plan = {"stages": [{"layer": 1, "keep": 5, "scorer": {"name": "old_style", "sign": -1.0}, "selector": "topk"}]}
    with torch.no_grad(), tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        model(**inputs)
    assert att.trace.stages[0].visual_after == [5]
