"""Plugins under misuse (issue 16, items 4, 5 and 6): a scorer whose output is not finite floats, a
class without ``score()`` / ``select()``, and broken third-party plugins, which are set aside so that
the built-ins and the healthy plugins keep working (``TOKENREDUCE_STRICT_PLUGINS=1``: fail fast)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import tokenreduce
from tokenreduce import DuplicateComponentError, PlanError, PluginLoadError, Scorer, Selector, TokenReduceError
from tokenreduce.core.checks import check_scores
from tokenreduce.core.errors import ComponentOutputError, RegistrationError, UnknownComponentError
from tokenreduce.core.registry import (
    STRICT_ENV,
    Registry,
    broken_plugins,
    get_registry,
    hookimpl,
    make_plugin_manager,
    reset_registry,
)
from tokenreduce.core.types import Selection
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"


# -- small components -------------------------------------------------------------------------------
class GoodScorer(Scorer):
    """A healthy scorer: the L2 norm of the hidden states."""

    def score(self, view):
        return view.visual_hidden().float().norm(dim=-1)


class GoodSelector(Selector):
    """A healthy selector: the first k candidates."""

    def select(self, view, scores, keep):
        return Selection.from_lists([list(range(k)) for k in keep.tolist()], device=view.hidden.device)


class ForgetfulScorer(Scorer):
    """A scorer that forgot score(): only the base's stub."""


class ForgetfulSelector(Selector):
    """A selector that forgot select()."""


class PlainNoScore:
    """A class without a base, with Settings but no score()."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, settings):
        self.settings = settings


class NoSettings:
    """Has score() but no Settings model."""

    def score(self, view):
        return view.visual_hidden().float().norm(dim=-1)


class Plugin:
    """A plugin object whose hook runs ``calls``: ``(kind, name, cls)`` or callables."""

    def __init__(self, *calls):
        self.calls = calls

    @hookimpl
    def tokenreduce_register(self, registry):
        for call in self.calls:
            if callable(call):
                call(registry)
            else:
                kind, name, cls = call
                getattr(registry, kind)(name, cls)


def build(*plugins: tuple[str, object], strict: bool | None = False) -> Registry:
    """The built-ins plus ``plugins`` (no installed entry points); ``strict=None``: as the environment says."""
    pm = make_plugin_manager(entry_points=False)
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    return Registry.from_plugin_manager(pm, strict=strict)


def _raise(registry):
    raise ZeroDivisionError("the plugin's own bug")


# ================================================================ item 5: the contract at registration
@pytest.mark.parametrize(
    ("kind", "cls", "missing"),
    [
        ("scorer", ForgetfulScorer, "has no score() of its own (it inherits the stub of tokenreduce.Scorer"),
        ("selector", ForgetfulSelector, "has no select() of its own (it inherits the stub of tokenreduce.Selector"),
        ("scorer", PlainNoScore, "has no score() method"),
        ("scorer", GoodSelector, "has no score() method; it defines select(): register it with registry.selector"),
    ],
)
def test_class_without_its_method_is_refused_at_registration(kind, cls, missing):
    # before: accepted here and at plan build, then an AttributeError / NotImplementedError mid-forward
    with pytest.raises(RegistrationError) as info:
        build(("test:forgetful", Plugin((kind, "forgetful", cls))), strict=True)
    msg = str(info.value)
    assert f"{kind} 'forgetful' from test:forgetful" in msg  # what, and where it came from
    assert f"{cls.__module__}.{cls.__qualname__}" in msg  # the class
    assert missing in msg  # what is missing
    assert isinstance(info.value, TokenReduceError) and isinstance(info.value, TypeError)


def test_class_without_its_method_fails_the_plan_not_the_forward():
    registry = build(("test:forgetful", Plugin(("scorer", "forgetful", ForgetfulScorer))))
    plan = {"stages": [{"layer": 1, "keep": 4, "scorer": "forgetful", "selector": "topk"}]}
    with pytest.raises(RegistrationError, match=r"stages\.0\.scorer\.name.*ForgetfulScorer has no score\(\)"):
        tokenreduce.build_plan(plan, registry=registry)


def test_an_object_instead_of_a_class_is_refused():
    with pytest.raises(RegistrationError, match=r"scorer 'obj' from test:obj: expected a class, got"):
        build(("test:obj", Plugin(("scorer", "obj", GoodScorer()))), strict=True)


# ================================================================ item 6: a broken plugin is set aside
def test_plugin_whose_hook_raises_is_set_aside():
    # before: the ZeroDivisionError escaped from every registry use, built-in plans included
    registry = build(
        ("test:healthy", Plugin(("scorer", "healthy", GoodScorer))),
        ("test:raising", Plugin(("scorer", "early", GoodScorer), _raise)),
    )
    assert registry.get("scorer", "healthy").origin == "test:healthy"
    assert registry.get("selector", "topk").origin.startswith("builtin:")
    (broken,) = registry.broken
    assert broken.origin == "test:raising" and not broken.complete
    assert "ZeroDivisionError: the plugin's own bug" in broken.message
    # its component, registered before it raised, is unavailable with the plugin's error
    with pytest.raises(PluginLoadError) as info:
        registry.get("scorer", "early", context="stages.0.scorer.name")
    msg = str(info.value)
    assert "scorer 'early' (at stages.0.scorer.name) is unavailable" in msg and "test:raising" in msg
    assert isinstance(info.value.__cause__, PluginLoadError)
    # a name it never reached is unknown, and the message carries the plugin's error
    with pytest.raises(UnknownComponentError, match=r"unknown scorer 'later'.*test:raising.*ZeroDivisionError"):
        registry.get("scorer", "later")


def test_plugin_without_settings_is_set_aside_whole():
    registry = build(("test:half", Plugin(("selector", "fine", GoodSelector), ("scorer", "no_settings", NoSettings))))
    assert "fine" not in registry.names("selector")  # all or nothing: the plugin is broken
    (broken,) = registry.broken
    assert broken.complete and ("selector", "fine") in broken.components
    with pytest.raises(RegistrationError, match=r"'no_settings'.*test:half.*NoSettings needs a pydantic Settings"):
        registry.get("scorer", "no_settings")
    with pytest.raises(RegistrationError, match=r"selector 'fine' is unavailable.*set aside because.*no_settings"):
        registry.get("selector", "fine")
    # strict mode: fail fast, as before
    with pytest.raises(RegistrationError, match="no_settings"):
        build(
            ("test:half", Plugin(("selector", "fine", GoodSelector), ("scorer", "no_settings", NoSettings))),
            strict=True,
        )


def test_clash_with_a_builtin_keeps_the_builtin():
    registry = build(("test:clash", Plugin(("selector", "topk", GoodSelector), ("scorer", "mine", GoodScorer))))
    assert registry.get("selector", "topk").origin.startswith("builtin:")
    tokenreduce.build_plan("random_50", registry=registry)  # built-in plans work
    with pytest.raises(DuplicateComponentError, match=r"scorer 'mine' is unavailable.*'topk' is registered twice"):
        registry.get("scorer", "mine")


def test_clash_between_two_plugins_is_ambiguous():
    registry = build(
        ("test:first", Plugin(("scorer", "shared", GoodScorer), ("scorer", "first_only", GoodScorer))),
        ("test:second", Plugin(("scorer", "shared", GoodScorer), ("scorer", "second_only", GoodScorer))),
    )
    assert registry.get("scorer", "first_only").origin == "test:first"
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("scorer", "shared")
    assert "ambiguous" in str(info.value) and "test:first" in str(info.value) and "test:second" in str(info.value)
    with pytest.raises(DuplicateComponentError, match="second_only"):
        registry.get("scorer", "second_only")


def test_strict_env_value_is_checked(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "maybe")
    with pytest.raises(TokenReduceError, match=rf"{STRICT_ENV}='maybe' is not understood; allowed: 1 .* or 0"):
        build(strict=None)
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginLoadError, match="test:raising failed while registering.*ZeroDivisionError") as info:
        build(("test:raising", Plugin(_raise)), strict=None)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    monkeypatch.setenv(STRICT_ENV, "0")
    assert build(("test:raising", Plugin(_raise)), strict=None).broken


# -- installed (entry-point) plugins ------------------------------------------------------------------
GOOD_MODULE = """
from tokenreduce import Scorer, hookimpl


class Healthy(Scorer):
    '''A healthy plugin scorer.'''

    def score(self, view):
        return view.visual_hidden().float().norm(dim=-1)


@hookimpl
def tokenreduce_register(registry):
    registry.scorer("healthy_plugin_scorer", Healthy)
"""

IMPORT_ERROR_MODULE = "import a_module_that_is_not_installed_anywhere\n"

MISSPELLED_MODULE = """
from tokenreduce import hookimpl


@hookimpl
def tokenreduce_regster(registry):
    pass
"""

NO_HOOK_MODULE = """
def tokenreduce_register(registry):  # no @hookimpl: pluggy never sees it
    pass
"""

NAN_MODULE = """
import torch
from tokenreduce import Scorer, hookimpl


class NaNScorer(Scorer):
    '''Returns NaN scores.'''

    def score(self, view):
        return torch.full(view.visual_valid.shape, float("nan"), device=view.hidden.device)


@hookimpl
def tokenreduce_register(registry):
    registry.scorer("nan_scorer", NaNScorer)
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, module, source)`` fakes ``pip install`` of a one-module distribution with an
    entry point in the ``tokenreduce`` group."""
    modules: list[str] = []

    def _install(dist: str, module: str, source: str, version: str = "0.0.1", ep_name: str = "plug") -> None:
        root = tmp_path / dist
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[tokenreduce]\n{ep_name} = {module}\n")
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        monkeypatch.syspath_prepend(str(root))
        reset_registry()

    monkeypatch.delenv(STRICT_ENV, raising=False)
    reset_registry()
    yield _install
    for module in modules:
        sys.modules.pop(module, None)
    monkeypatch.undo()
    reset_registry()


def _install_all_broken(install) -> None:
    install("tr-healthy", "tr_healthy_plugin", GOOD_MODULE, ep_name="healthy")
    install("tr-import-error", "tr_import_error_plugin", IMPORT_ERROR_MODULE, version="1.0", ep_name="imp")
    install("tr-misspelled", "tr_misspelled_plugin", MISSPELLED_MODULE, version="2.0", ep_name="typo")
    install("tr-no-hook", "tr_no_hook_plugin", NO_HOOK_MODULE, version="3.0", ep_name="nohook")


def test_broken_entry_points_leave_builtins_and_healthy_plugins_working(install):
    _install_all_broken(install)
    with pytest.warns(RuntimeWarning, match="3 tokenreduce plugin"):
        registry = get_registry()
    assert registry.get("scorer", "healthy_plugin_scorer").origin.startswith("tr-healthy 0.0.1")
    tokenreduce.build_plan("random_50")  # a built-in plan
    broken = {b["distribution"]: b for b in broken_plugins()}
    assert set(broken) == {"tr-import-error 1.0", "tr-misspelled 2.0", "tr-no-hook 3.0"}
    assert broken["tr-import-error 1.0"]["plugin"] == "imp"
    assert "a_module_that_is_not_installed_anywhere" in broken["tr-import-error 1.0"]["error"]
    assert "tokenreduce_regster" in broken["tr-misspelled 2.0"]["error"]
    assert "spelled tokenreduce_register" in broken["tr-misspelled 2.0"]["error"]
    assert "defines no tokenreduce_register hook" in broken["tr-no-hook 3.0"]["error"]
    # an unknown name carries the errors of the plugins whose names are unknown
    with pytest.raises(PlanError) as info:
        tokenreduce.build_plan({"stages": [{"layer": 1, "keep": 2, "scorer": "from_imp", "selector": "topk"}]})
    msg = str(info.value)
    assert "unknown scorer 'from_imp' (at stages.0.scorer.name)" in msg and "healthy_plugin_scorer" in msg
    assert "tr-import-error 1.0" in msg and "a_module_that_is_not_installed_anywhere" in msg


def test_tokenreduce_list_shows_broken_plugins(install, capsys, tmp_path):
    from tokenreduce.cli.listing import cmd_list

    _install_all_broken(install)
    with pytest.warns(RuntimeWarning):
        assert cmd_list([f"out_dir={tmp_path / 'listing'}"]) == 0
    out = capsys.readouterr().out
    assert "healthy_plugin_scorer" in out and "topk" in out
    assert "broken plugins" in out
    for dist in ("tr-import-error 1.0", "tr-misspelled 2.0", "tr-no-hook 3.0"):
        assert dist in out
    assert "a_module_that_is_not_installed_anywhere" in out
    data = json.loads((tmp_path / "listing" / "results.json").read_text())
    assert {b["distribution"] for b in data["broken_plugins"]} == {
        "tr-import-error 1.0",
        "tr-misspelled 2.0",
        "tr-no-hook 3.0",
    }


def test_strict_mode_fails_fast_on_entry_points(install, monkeypatch):
    install("tr-misspelled", "tr_misspelled_plugin", MISSPELLED_MODULE, version="2.0", ep_name="typo")
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginLoadError, match=r"tr-misspelled 2\.0.*tokenreduce_regster"):
        tokenreduce.list_components()


# ================================================================ item 4: scorer output values
def _stage():
    return tokenreduce.build_plan({"stages": [{"layer": 1, "keep": 2, "scorer": "norm", "selector": "topk"}]}).stages[0]


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (float("nan"), "1 NaN"),
        (float("inf"), "1 +inf"),
        (float("-inf"), "1 -inf"),
    ],
)
def test_non_finite_scores_are_refused(bad, what):
    scores = torch.rand(2, 5)
    scores[1, 3] = bad
    with pytest.raises(ComponentOutputError) as info:
        check_scores(_stage(), scores, (2, 5))
    msg = str(info.value)
    assert "stages.0.scorer 'norm'" in msg and "layer 1" in msg  # the stage and the scorer
    assert "non-finite" in msg and what in msg and "sample 1, candidate 3" in msg
    assert isinstance(info.value, RuntimeError)  # as the shape errors always were


def test_non_finite_scores_at_invalid_candidates_are_ignored():
    scores = torch.rand(2, 5)
    scores[1, 3:] = float("-inf")  # padding of a ragged batch: the contract says these are ignored
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    check_scores(_stage(), scores, (2, 5), valid=valid)
    valid[1, 3] = True
    with pytest.raises(ComponentOutputError, match="sample 1, candidate 3"):
        check_scores(_stage(), scores, (2, 5), valid=valid)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_scores_are_refused(dtype):
    with pytest.raises(ComponentOutputError, match=rf"stages\.0\.scorer 'norm' .* dtype {dtype}; expected a floating"):
        check_scores(_stage(), torch.ones(2, 5, dtype=dtype), (2, 5))


def test_nan_scorer_plugin_fails_the_forward_and_leaves_the_model_untouched(install):
    install("tr-nan", "tr_nan_plugin", NAN_MODULE)
    model = build_tiny("llava")
    inputs = make_inputs("llava", [PROMPT])
    with torch.no_grad():
        before = model(**inputs).logits
    plan = {"stages": [{"layer": 1, "keep": 4, "scorer": "nan_scorer", "selector": "topk"}]}
    # before: topk kept the first 4 tokens and nothing was said
    with pytest.raises(ComponentOutputError, match=r"stages\.0\.scorer 'nan_scorer' .*16 NaN"):
        with torch.no_grad(), tokenreduce.apply(model, plan):
            model(**inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_registry_is_normal_again():
    # the installed fakes leave no trace for the tests that follow
    assert not any(b.origin.startswith("tr-") for b in get_registry().broken)
    assert "healthy_plugin_scorer" not in get_registry().names("scorer")
