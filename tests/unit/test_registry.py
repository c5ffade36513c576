"""The registry: fed through pluggy only, one name table, clear errors."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

import tokenreduce
from tokenreduce import DuplicateComponentError, UnknownComponentError
from tokenreduce.core import registry as registry_mod
from tokenreduce.core.registry import Registry, get_registry, hookimpl, list_components, make_plugin_manager

# ---------------------------------------------------------------------------- small components


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = 1.0


class ScorerA:
    """Scorer A: first docstring line is the summary.

    More text that is not part of the summary.
    """

    Settings = _Settings

    def __init__(self, settings):
        self.settings = settings

    def score(self, view):
        return view.visual_hidden().float().norm(dim=-1)


class SelectorB:
    """Selector B."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, settings):
        self.settings = settings

    def select(self, view, scores, keep):
        raise NotImplementedError


class NoSettings:
    """Lacks a Settings model."""

    def score(self, view):
        raise NotImplementedError


class AdapterC:
    """Adapter C."""

    model_types = ("arch_c", "arch_c2")


class Plugin:
    """A plugin object whose hook runs ``calls`` (a list of ``(kind, name, cls)`` or callables)."""

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


def build(*plugins: tuple[str, object], strict: bool = False) -> Registry:
    """A registry of ``plugins`` alone.  ``strict``: a broken plugin raises (``TOKENREDUCE_STRICT_PLUGINS=1``);
    otherwise it is set aside (tests/unit/test_misuse_registry.py)."""
    return Registry.from_plugin_manager(make_plugin_manager(builtins=list(plugins), entry_points=False), strict=strict)


# ---------------------------------------------------------------------------- registration


def test_registration_and_lookup():
    reg = build(("test:one", Plugin(("scorer", "score_a", ScorerA), ("selector", "select_b", SelectorB))))
    comp = reg.get("scorer", "score_a")
    assert (comp.kind, comp.name, comp.cls, comp.settings, comp.origin) == (
        "scorer",
        "score_a",
        ScorerA,
        _Settings,
        "test:one",
    )
    assert comp.summary == "Scorer A: first docstring line is the summary."
    assert reg.get("selector", "select_b").settings is SelectorB.Settings
    assert reg.names("scorer") == ["score_a"]
    assert reg.names("selector") == ["select_b"]
    assert reg.names("adapter") == []


def test_explicit_settings_model_overrides_class_attribute():
    class Explicit(BaseModel):
        model_config = ConfigDict(extra="forbid")
        beta: int = 2

    reg = build(("test:one", Plugin(lambda r: r.scorer("explicit", NoSettings, Explicit))))
    assert reg.get("scorer", "explicit").settings is Explicit


def test_adapters_have_empty_settings_and_match_model_types():
    reg = build(("test:adapters", Plugin(("adapter", "arch_c", AdapterC))))
    comp = reg.get("adapter", "arch_c")
    assert comp.settings.model_validate({}) is not None
    with pytest.raises(ValidationError):
        comp.settings.model_validate({"x": 1})
    assert reg.adapter_for("arch_c2") is comp
    assert reg.adapter_for("llama") is None


def test_architecture_registers_its_spec_and_adapter():
    from tokenreduce.core.arch import ArchSpec
    from tokenreduce.core.errors import UnsupportedModelError

    class ArchD(ArchSpec):
        model_type = "arch_d"
        adapter = AdapterC

    spec = ArchD()
    reg = build(("test:arch", Plugin(lambda r: r.architecture(spec))))
    assert reg.spec_for("arch_d") is spec
    assert reg.get("adapter", "arch_d").cls is AdapterC
    assert reg.get("architecture", "arch_d").origin == "test:arch"
    assert reg.specs() == [spec]
    with pytest.raises(
        UnsupportedModelError, match=r"'nope' has no registered architecture.*registered architectures: arch_d"
    ):
        reg.spec_for("nope")
    # a spec method the architecture does not provide fails with its name, not an AttributeError
    with pytest.raises(UnsupportedModelError, match=r"architecture 'arch_d' .* does not provide vision_flops"):
        spec.vision_flops(None, 4)
    with pytest.raises(TypeError, match="expected an ArchSpec instance"):
        build(("test:bad", Plugin(lambda r: r.architecture(ArchD))), strict=True)


def test_adapter_without_spec_is_named_as_such():
    from tokenreduce.core.errors import UnsupportedModelError

    reg = build(("test:adapters", Plugin(("adapter", "arch_c", AdapterC))))
    with pytest.raises(UnsupportedModelError, match="only an adapter is registered for it"):
        reg.spec_for("arch_c", what="the model loader")


def test_each_entry_carries_its_own_plugins_origin():
    reg = build(
        ("test:first", Plugin(("scorer", "score_a", ScorerA))),
        ("test:second", Plugin(("selector", "select_b", SelectorB), ("adapter", "arch_c", AdapterC))),
    )
    origins = {(c.kind, c.name): c.origin for c in reg.components()}
    assert origins == {
        ("scorer", "score_a"): "test:first",
        ("selector", "select_b"): "test:second",
        ("adapter", "arch_c"): "test:second",
    }


def test_components_sorted_and_filtered_by_kind():
    reg = build(
        (
            "test:one",
            Plugin(("selector", "zeta", SelectorB), ("selector", "alpha", SelectorB), ("scorer", "mid", ScorerA)),
        )
    )
    assert [(c.kind, c.name) for c in reg.components()] == [
        ("scorer", "mid"),
        ("selector", "alpha"),
        ("selector", "zeta"),
    ]
    assert [c.name for c in reg.components("selector")] == ["alpha", "zeta"]


def test_same_name_in_different_kinds_is_allowed():
    reg = build(("test:one", Plugin(("scorer", "same", ScorerA), ("selector", "same", SelectorB))))
    assert reg.get("scorer", "same").cls is ScorerA
    assert reg.get("selector", "same").cls is SelectorB


def test_module_plugin_and_plugin_without_hook():
    module = types.ModuleType("some_plugin_module")

    @hookimpl
    def tokenreduce_register(registry):
        registry.scorer("from_module", ScorerA)

    module.tokenreduce_register = tokenreduce_register
    reg = build(("test:module", module), ("test:nohook", object()))
    assert reg.get("scorer", "from_module").origin == "test:module"
    assert len(reg.components()) == 1


def test_list_components_output(monkeypatch):
    reg = build(("test:one", Plugin(("scorer", "score_a", ScorerA), ("selector", "select_b", SelectorB))))
    monkeypatch.setattr(registry_mod, "_registry", reg)
    assert list_components() == [
        {
            "kind": "scorer",
            "name": "score_a",
            "origin": "test:one",
            "summary": "Scorer A: first docstring line is the summary.",
        },
        {"kind": "selector", "name": "select_b", "origin": "test:one", "summary": "Selector B."},
    ]
    assert [c["name"] for c in list_components("selector")] == ["select_b"]


# ---------------------------------------------------------------------------- errors
# Registration errors as raised in strict mode (TOKENREDUCE_STRICT_PLUGINS=1); by default the plugin is set
# aside instead and the same error is raised when a plan names its component (test_misuse_registry.py).


def test_unknown_name_lists_known_ones():
    reg = build(
        (
            "test:one",
            Plugin(
                ("selector", "select_b", SelectorB), ("selector", "alpha", SelectorB), ("scorer", "score_a", ScorerA)
            ),
        )
    )
    with pytest.raises(UnknownComponentError) as info:
        reg.get("selector", "nope", context="stages.3.selector.name")
    msg = str(info.value)
    assert msg == "unknown selector 'nope' (at stages.3.selector.name); known selectors: alpha, select_b"
    assert isinstance(info.value, KeyError)  # but readable: str() is not quoted by KeyError


def test_unknown_name_with_nothing_registered():
    with pytest.raises(UnknownComponentError, match=r"known scorers: \(none\)"):
        build().get("scorer", "norm")


def test_duplicate_across_plugins_names_both_origins():
    with pytest.raises(DuplicateComponentError) as info:
        build(
            ("test:first", Plugin(("scorer", "dup", ScorerA))),
            ("test:second", Plugin(("scorer", "dup", ScorerA))),
            strict=True,
        )
    msg = str(info.value)
    assert "scorer 'dup'" in msg and "test:first" in msg and "test:second" in msg


def test_duplicate_within_one_plugin():
    with pytest.raises(DuplicateComponentError, match="test:one.*test:one"):
        build(("test:one", Plugin(("selector", "dup", SelectorB), ("selector", "dup", SelectorB))), strict=True)


def test_duplicate_of_a_builtin_names_both_origins():
    from tokenreduce import strategies

    with pytest.raises(DuplicateComponentError) as info:
        build(
            ("builtin:tokenreduce.strategies", strategies),
            ("test:clash", Plugin(("selector", "topk", SelectorB))),
            strict=True,
        )
    assert "builtin:tokenreduce.strategies" in str(info.value) and "test:clash" in str(info.value)


@pytest.mark.parametrize("name", ["TopK", "1abc", "a-b", "", "with space", "_private", "é"])
def test_invalid_names_rejected(name):
    with pytest.raises(ValueError) as info:
        build(("test:bad", Plugin(("scorer", name, ScorerA))), strict=True)
    msg = str(info.value)
    assert repr(name) in msg and "test:bad" in msg and "lower_snake" in msg


def test_non_string_name_rejected():
    with pytest.raises(ValueError, match="lower_snake"):
        build(("test:bad", Plugin(("selector", 3, SelectorB))), strict=True)


def test_missing_settings_rejected():
    with pytest.raises(TypeError) as info:
        build(("test:bad", Plugin(("scorer", "no_settings", NoSettings))), strict=True)
    msg = str(info.value)
    assert "'no_settings'" in msg and "test:bad" in msg and "Settings" in msg


def test_settings_must_be_a_pydantic_model():
    class DictSettings:
        Settings = dict

    with pytest.raises(TypeError, match="pydantic"):
        build(("test:bad", Plugin(("selector", "dict_settings", DictSettings))), strict=True)


# ---------------------------------------------------------------------------- the default registry


BUILTINS = {
    ("adapter", "llava"),
    ("selector", "topk"),
    ("selector", "random"),
    ("selector", "uniform"),
    ("scorer", "norm"),
}


def test_default_registry_has_the_builtins_with_builtin_origin():
    listed = {(c["kind"], c["name"]): c for c in tokenreduce.list_components()}
    assert BUILTINS <= set(listed)
    for key in BUILTINS:
        assert listed[key]["origin"].startswith("builtin:"), listed[key]
        assert listed[key]["summary"], f"{key} has no docstring summary"


def test_builtins_registered_through_pluggy_like_plugins():
    # the default plugin manager without entry points gives exactly the built-ins
    reg = Registry.from_plugin_manager(make_plugin_manager(entry_points=False))
    assert BUILTINS <= {(c.kind, c.name) for c in reg.components()}
    assert all(c.origin.startswith("builtin:") for c in reg.components())


def test_get_registry_is_cached_and_reset_rebuilds():
    first = get_registry()
    assert get_registry() is first
    registry_mod.reset_registry()
    second = get_registry()
    assert second is not first
    assert [c.name for c in second.components()] == [c.name for c in first.components()]


def _all_components():
    return [pytest.param(c, id=f"{c.kind}:{c.name}") for c in get_registry().components()]


@pytest.mark.parametrize("comp", _all_components())
def test_every_component_settings_validate_defaults_and_reject_unknown_keys(comp):
    settings = comp.settings.model_validate({})
    with pytest.raises(ValidationError) as info:
        comp.settings.model_validate({"surely_not_a_setting": 1})
    assert "surely_not_a_setting" in str(info.value)
    if comp.kind in ("scorer", "selector"):
        comp.cls(settings)  # instantiable from default settings
