"""A real entry-point plugin: a fake installed distribution on ``sys.path`` is found by
``importlib.metadata``, loaded through pluggy, and its components are usable by name."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tokenreduce
from tokenreduce import DuplicateComponentError, PlanError, PluginLoadError
from tokenreduce.core.registry import STRICT_ENV, broken_plugins, get_registry, reset_registry
from tokenreduce.core.types import TokenView

GOOD_MODULE = '''
"""A third-party strategy package, as a user would write it."""
import torch
from pydantic import BaseModel, ConfigDict

from tokenreduce.core.registry import hookimpl
from tokenreduce.core.types import Need, Selection


class FakeScore:
    """Fake scorer: prefers early candidates (score = sign * candidate index)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sign: float = -1.0

    needs = Need.HIDDEN

    def __init__(self, settings):
        self.settings = settings

    def score(self, view):
        B, N = view.visual_valid.shape
        return self.settings.sign * torch.arange(N, dtype=torch.float32, device=view.hidden.device).expand(B, N)


class FakeLast:
    """Fake selector: keeps the last k candidates of each sample."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    needs = Need.NONE
    needs_scores = False

    def __init__(self, settings):
        self.settings = settings

    def select(self, view, scores, keep):
        rows = [list(range(n - k, n)) for n, k in zip(view.n_visual.tolist(), keep.tolist())]
        return Selection.from_lists(rows, device=view.hidden.device)


@hookimpl
def tokenreduce_register(registry):
    registry.scorer("fake_score", FakeScore)
    registry.selector("fake_last", FakeLast)
'''

BROKEN_MODULE = """
import a_module_that_is_not_installed_anywhere  # raises ImportError on import
"""

CLASH_MODULE = '''
from pydantic import BaseModel, ConfigDict
from tokenreduce.core.registry import hookimpl


class MyTopK:
    """Another topk."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, settings):
        self.settings = settings

    def select(self, view, scores, keep):
        raise NotImplementedError


@hookimpl
def tokenreduce_register(registry):
    registry.selector("topk", MyTopK)
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist_name, module_name, source)`` fakes ``pip install`` of a one-module
    distribution exposing ``module_name`` under the ``tokenreduce`` entry-point group."""
    modules: list[str] = []

    def _install(
        dist: str,
        module: str,
        source: str,
        version: str = "0.0.1",
        ep_name: str = "fake",
        conf: dict[str, str] | None = None,
        conf_package: str | None = None,
    ) -> Path:
        """``conf``: files of a config folder shipped as package ``<module>_conf`` (``{"plan/x.yaml":
        text}``) and named under ``tokenreduce.conf`` (``conf_package`` names another package)."""
        root = tmp_path / dist
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        entry_points = f"[tokenreduce]\n{ep_name} = {module}\n"
        if conf is not None or conf_package is not None:
            entry_points += f"\n[tokenreduce.conf]\n{ep_name} = {conf_package or module + '_conf'}\n"
            for relative, text in (conf or {}).items():
                path = root / f"{module}_conf" / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(textwrap.dedent(text))
        (info / "entry_points.txt").write_text(entry_points)
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        monkeypatch.syspath_prepend(str(root))  # also invalidates the import/metadata caches
        reset_registry()
        return root

    reset_registry()
    yield _install
    for module in modules:
        sys.modules.pop(module, None)
    monkeypatch.undo()  # sys.path back to normal before the registry is rebuilt by anyone
    reset_registry()


def test_registry_is_normal_without_plugins():
    # also guards that the fixtures below leave no trace for the tests that follow them
    names = {c["name"] for c in tokenreduce.list_components()}
    assert "fake_score" not in names and "fake_last" not in names


def test_plugin_components_listed_with_distribution_origin(install):
    install("tokenreduce-fake-plugin", "fake_tokenreduce_plugin", GOOD_MODULE)
    listed = {(c["kind"], c["name"]): c for c in tokenreduce.list_components()}
    for key in [("scorer", "fake_score"), ("selector", "fake_last")]:
        assert key in listed
        assert listed[key]["origin"].startswith("tokenreduce-fake-plugin 0.0.1"), listed[key]["origin"]
        assert "'fake'" in listed[key]["origin"]  # the entry point's name
    assert listed[("scorer", "fake_score")]["summary"].startswith("Fake scorer")
    # the built-ins are still there, with their own origin
    assert listed[("selector", "topk")]["origin"].startswith("builtin:")


def test_plugin_components_usable_by_name_on_synthetic_data(install):
    install("tokenreduce-fake-plugin", "fake_tokenreduce_plugin", GOOD_MODULE)
    compiled = tokenreduce.build_plan(
        {
            "stages": [
                {"layer": 1, "keep": 6, "scorer": "fake_score", "selector": "topk"},
                {"layer": 3, "keep": 2, "selector": "fake_last"},
            ]
        },
        n_layers=4,
    )
    B, N, d = 2, 10, 4
    n = torch.tensor([10, 8])
    valid = torch.arange(N).unsqueeze(0) < n.unsqueeze(1)
    view = TokenView(
        layer=1,
        stage=0,
        hidden=torch.randn(B, N + 2, d),
        valid=torch.ones(B, N + 2, dtype=torch.bool),
        visual_index=torch.where(valid, torch.arange(1, N + 1).expand(B, N), 0),
        visual_valid=valid,
        original_index=torch.where(valid, torch.arange(1, N + 1).expand(B, N), -1),
        n_original_visual=n,
        signals=None,
    )
    first, second = compiled.stages
    scores = first.scorer.score(view)
    keep = torch.tensor([6, 6])
    assert first.selector.select(view, scores, keep).to_lists() == [[0, 1, 2, 3, 4, 5]] * 2
    assert second.selector.select(view, None, torch.tensor([2, 2])).to_lists() == [[8, 9], [6, 7]]


def test_plugin_settings_validated_like_builtins(install):
    install("tokenreduce-fake-plugin", "fake_tokenreduce_plugin", GOOD_MODULE)
    plan = {"stages": [{"layer": 1, "keep": 2, "scorer": {"name": "fake_score", "sgn": 1}, "selector": "topk"}]}
    with pytest.raises(PlanError, match=r"stages\.0\.scorer\.sgn"):
        tokenreduce.build_plan(plan)
    plan["stages"][0]["scorer"] = {"name": "fake_score", "sign": 1}
    assert tokenreduce.build_plan(plan).stages[0].scorer.settings.sign == 1.0


def test_plugin_runs_in_a_tiny_model(install):
    from tokenreduce.testing.tiny import IMAGE_TOKEN_ID, build_tiny, make_inputs

    install("tokenreduce-fake-plugin", "fake_tokenreduce_plugin", GOOD_MODULE)
    model = build_tiny("llava")
    inputs = make_inputs("llava", ["USER: <image> what color is the shape? ASSISTANT:"])
    visual = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN_ID).flatten().tolist()
    assert len(visual) == 16
    plan = {
        "stages": [
            {"layer": 1, "keep": 6, "scorer": "fake_score", "selector": "topk"},  # the first 6
            {"layer": 2, "keep": 2, "selector": "fake_last"},  # then the last 2 of those
        ]
    }
    with torch.no_grad(), tokenreduce.apply(model, plan) as att:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    first, second = att.trace.stages
    assert first.visual_before == [16] and first.visual_after == [6]
    assert first.kept == [visual[:6]]
    assert second.visual_before == [6] and second.visual_after == [2]
    assert second.kept == [visual[4:6]]


def test_broken_plugin_names_its_distribution_in_strict_mode(install, monkeypatch):
    # TOKENREDUCE_STRICT_PLUGINS=1: today's fail-fast behaviour
    monkeypatch.setenv(STRICT_ENV, "1")
    install("tokenreduce-broken-plugin", "broken_tokenreduce_plugin", BROKEN_MODULE, version="1.2.3")
    with pytest.raises(PluginLoadError) as info:
        tokenreduce.list_components()
    msg = str(info.value)
    assert "tokenreduce-broken-plugin 1.2.3" in msg
    assert "broken_tokenreduce_plugin" in msg  # the entry point's target
    assert "a_module_that_is_not_installed_anywhere" in msg  # the cause
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ImportError)
    # a plan cannot be built while the plugin is broken either
    with pytest.raises(PluginLoadError):
        tokenreduce.build_plan({"stages": [{"layer": 1, "keep": 2, "selector": "random"}]})


def test_broken_plugin_is_set_aside_and_named(install):
    # by default the broken plugin is set aside: built-ins work, the plugin is listed with its error
    install("tokenreduce-broken-plugin", "broken_tokenreduce_plugin", BROKEN_MODULE, version="1.2.3")
    with pytest.warns(RuntimeWarning, match="tokenreduce-broken-plugin 1.2.3"):
        names = {c["name"] for c in tokenreduce.list_components()}
    assert {"topk", "random"} <= names
    (broken,) = broken_plugins()
    assert broken["distribution"] == "tokenreduce-broken-plugin 1.2.3" and broken["plugin"] == "fake"
    assert "a_module_that_is_not_installed_anywhere" in broken["error"]
    tokenreduce.build_plan({"stages": [{"layer": 1, "keep": 2, "selector": "random"}]})
    # its component names are unknown: an unknown name carries the plugin's error
    with pytest.raises(PlanError) as info:
        tokenreduce.build_plan({"stages": [{"layer": 1, "keep": 2, "selector": "its_selector"}]})
    msg = str(info.value)
    assert "unknown selector 'its_selector'" in msg and "tokenreduce-broken-plugin 1.2.3" in msg
    assert "a_module_that_is_not_installed_anywhere" in msg


def test_plugin_clashing_with_a_builtin_names_both_origins(install, monkeypatch):
    install("tokenreduce-fake-clash", "clash_tokenreduce_plugin", CLASH_MODULE)
    with pytest.warns(RuntimeWarning, match="registered twice"):
        registry = get_registry()
    assert registry.get("selector", "topk").origin.startswith("builtin:")  # the built-in keeps its name
    (broken,) = registry.broken
    for msg in (broken.message, str(broken.error)):
        assert "selector 'topk'" in msg
        assert "builtin:tokenreduce.strategies" in msg
        assert "tokenreduce-fake-clash 0.0.1" in msg
    # strict mode: fail fast, as before
    monkeypatch.setenv(STRICT_ENV, "1")
    reset_registry()
    with pytest.raises(DuplicateComponentError) as info:
        get_registry()
    msg = str(info.value)
    assert "selector 'topk'" in msg
    assert "builtin:tokenreduce.strategies" in msg
    assert "tokenreduce-fake-clash 0.0.1" in msg


def test_two_plugins_coexist(install):
    install("tokenreduce-fake-plugin", "fake_tokenreduce_plugin", GOOD_MODULE)
    install(
        "tokenreduce-other-plugin",
        "other_tokenreduce_plugin",
        GOOD_MODULE.replace('"fake_score"', '"other_score"').replace('"fake_last"', '"other_last"'),
        version="2.0",
        ep_name="other",
    )
    origins = {c["name"]: c["origin"] for c in tokenreduce.list_components()}
    assert origins["fake_score"].startswith("tokenreduce-fake-plugin 0.0.1")
    assert origins["other_last"].startswith("tokenreduce-other-plugin 2.0")


# -- presets shipped by a plugin (entry-point group tokenreduce.conf) -------------------------------
PLUGIN_PRESET = """
description: the fake plugin's own plan
stages:
  - layer: 1
    keep: 3
    scorer: fake_score
    selector: fake_last
"""
CLASHING_PRESET = """
description: a plugin's demo, hidden by the built-in one
stages: []
"""
TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56"]


def test_plugin_presets_are_used_by_name_in_plan_and_plans(install, tmp_path, capsys):
    import json

    from tokenreduce.cli import main
    from tokenreduce.core.conf import preset_conflicts, preset_names, preset_origin
    from tokenreduce.core.presets import load_preset

    install("fake-preset-plugin", "fake_preset_plugin", GOOD_MODULE, conf={"plan/fake_last_3.yaml": PLUGIN_PRESET})
    assert "fake_last_3" in preset_names("plan")
    assert preset_origin("plan", "fake_last_3") == "fake-preset-plugin 0.0.1 (entry point 'fake')"
    assert load_preset("fake_last_3").stages[0].selector.name == "fake_last"
    assert preset_conflicts("plan") == {}
    out = tmp_path / "flops"
    argv = ["flops", "plans=[demo,fake_last_3]", *TINY, "flops.n_visual=16", f"out_dir={out}"]
    assert main(argv) == 0, capsys.readouterr().err
    accounting = json.loads((out / "results.json").read_text())["accounting"]
    assert list(accounting) == ["vanilla", "demo", "fake_last_3"]
    assert accounting["fake_last_3"]["per_layer_visual"] == [16, 3, 3, 3]
    # the same preset as `plan=`, in a tiny model: the plugin's selector keeps the last 3 candidates
    out = tmp_path / "run"
    argv = ["run", "plan=fake_last_3", *TINY, "run.max_new_tokens=1", "run.vanilla=false", f"out_dir={out}"]
    assert main(argv) == 0, capsys.readouterr().err
    trace = json.loads((out / "results.json").read_text())["trace"]
    assert trace["visual_per_layer"] == [[16, 3, 3, 3]]
    kept = trace["stages"][0]["kept"][0]
    assert len(kept) == 3 and kept == sorted(kept)


def test_a_plugin_preset_cannot_hide_a_builtin_one(install, capsys):
    from tokenreduce.cli import main
    from tokenreduce.core.conf import preset_conflicts
    from tokenreduce.core.presets import load_preset

    install("fake-clash-preset", "fake_clash_preset", GOOD_MODULE, conf={"plan/demo.yaml": CLASHING_PRESET})
    assert load_preset("demo").stages  # the built-in demo, not the plugin's empty plan
    assert preset_conflicts("plan") == {"demo": ["tokenreduce", "fake-clash-preset 0.0.1 (entry point 'fake')"]}
    assert main(["list"]) == 0
    assert "plan preset 'demo' is defined by tokenreduce and fake-clash-preset 0.0.1" in capsys.readouterr().out


def test_a_conf_entry_point_without_its_folder_is_skipped_with_a_warning(install):
    from tokenreduce.core.conf import plugin_conf_dirs, preset_names

    install("fake-no-conf", "fake_no_conf", GOOD_MODULE, conf_package="no_such_conf_package")
    with pytest.warns(RuntimeWarning, match=r"entry point 'fake' = 'no_such_conf_package' of fake-no-conf 0.0.1"):
        assert plugin_conf_dirs() == []
    assert "demo" in preset_names("plan")  # the built-ins stay usable


def test_registry_is_normal_again_after_plugins():
    from tokenreduce.core.conf import plugin_conf_dirs

    test_registry_is_normal_without_plugins()
    assert not any(p.origin.startswith("fake-") for p in plugin_conf_dirs())
    assert not any(c["origin"].startswith("tokenreduce-") for c in tokenreduce.list_components())
