"""The one registry of scorers, selectors and adapters, fed only through pluggy.

Every component, built-in or third-party, arrives through the same hook::

    from tokenreduce.core.registry import hookimpl

    @hookimpl
    def tokenreduce_register(registry):
        registry.scorer("my_scorer", MyScorer)
        registry.selector("my_selector", MySelector)
        registry.adapter("my_arch", MyAdapter)

Built-ins are the modules :mod:`tokenreduce.strategies` and :mod:`tokenreduce.adapters`.  A
third-party package exposes a module with such a hook implementation under the entry-point
group ``tokenreduce`` (``[project.entry-points.tokenreduce] my_plugin = "my_pkg.plugin"``).

Names are ``lower_snake``; each ``(kind, name)`` may be registered once.  Unknown names raise
listing the known ones; duplicates name both origins; an entry point that fails to import names
its distribution.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy
from pydantic import BaseModel

from .errors import DuplicateComponentError, PluginLoadError, UnknownComponentError

PROJECT = "tokenreduce"
ENTRY_POINT_GROUP = "tokenreduce"
KINDS = ("scorer", "selector", "adapter")
#: modules whose ``tokenreduce_register`` hook provides the built-in components
BUILTIN_PLUGINS = ("tokenreduce.strategies", "tokenreduce.adapters")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    """The plugin hook surface (one hook)."""

    @hookspec
    def tokenreduce_register(self, registry: "Registrar") -> None:
        """Register components by calling ``registry.scorer/selector/adapter``."""


@dataclass(frozen=True)
class Component:
    """One registry entry."""

    kind: str
    name: str
    cls: type
    settings: type[BaseModel]
    origin: str

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


class Registrar:
    """Handed to each plugin's ``tokenreduce_register``; records entries with the plugin's origin."""

    def __init__(self, registry: "Registry", origin: str):
        self._registry = registry
        self._origin = origin

    def scorer(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._registry._add("scorer", name, cls, settings, self._origin)

    def selector(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._registry._add("selector", name, cls, settings, self._origin)

    def adapter(self, name: str, cls: type) -> None:
        self._registry._add("adapter", name, cls, _NoSettings, self._origin)


class _NoSettings(BaseModel, extra="forbid"):
    pass


class Registry:
    """Name table ``(kind, name) -> Component``, populated from a pluggy plugin manager."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Component] = {}

    # -- population ---------------------------------------------------------------------------
    def _add(self, kind: str, name: str, cls: type, settings: type[BaseModel] | None, origin: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{kind} name {name!r} from {origin} must be lower_snake ([a-z][a-z0-9_]*)")
        settings = settings if settings is not None else getattr(cls, "Settings", None)
        if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
            raise TypeError(f"{kind} {name!r} from {origin}: needs a pydantic Settings model (cls.Settings)")
        key = (kind, name)
        if key in self._entries:
            other = self._entries[key]
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by {other.origin} and by {origin}; "
                "rename one of them or uninstall one plugin"
            )
        self._entries[key] = Component(kind, name, cls, settings, origin)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> "Registry":
        """Call every registered plugin's hook, each with a registrar that knows its origin."""
        registry = cls()
        for plugin in pm.get_plugins():
            impl = getattr(plugin, "tokenreduce_register", None)
            if impl is None:
                continue
            origin = pm.get_name(plugin) or repr(plugin)
            # call the hook of this plugin alone, so every entry carries its own origin
            pm.subset_hook_caller("tokenreduce_register", remove_plugins=[p for p in pm.get_plugins() if p is not plugin])(
                registry=Registrar(registry, origin)
            )
        return registry

    # -- lookup -------------------------------------------------------------------------------
    def get(self, kind: str, name: str, *, context: str = "") -> Component:
        try:
            return self._entries[(kind, name)]
        except KeyError:
            known = sorted(n for k, n in self._entries if k == kind)
            where = f" (at {context})" if context else ""
            raise UnknownComponentError(
                f"unknown {kind} {name!r}{where}; known {kind}s: {', '.join(known) or '(none)'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._entries if k == kind)

    def components(self, kind: str | None = None) -> list[Component]:
        return [c for (k, _), c in sorted(self._entries.items()) if kind is None or k == kind]

    def adapter_for(self, model_type: str) -> Component | None:
        for comp in self.components("adapter"):
            if model_type in getattr(comp.cls, "model_types", ()):
                return comp
        return None


# -- the process-wide registry ------------------------------------------------------------------
def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return f"{dist.metadata['Name']} {dist.version}"
    return "an unknown distribution"


def make_plugin_manager(builtins: Iterable[tuple[str, Any]] | None = None, entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins and (optionally) the ``tokenreduce`` entry points."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    if builtins is None:  # built-ins register like everyone else, by module name (as pytest does)
        builtins = [(f"builtin:{name}", importlib.import_module(name)) for name in BUILTIN_PLUGINS]
    for name, module in builtins:
        pm.register(module, name=name)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            label = _dist_label(ep)
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of a third-party package
                raise PluginLoadError(
                    f"plugin entry point {ep.name!r} ({ep.value}) of distribution {label} failed to import: "
                    f"{type(exc).__name__}: {exc}. Fix or uninstall {label.split(' ')[0]!r}."
                ) from exc
            name = f"{label} (entry point {ep.name!r})"
            pm.register(plugin, name=name)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginLoadError(f"plugin {name}: {exc} (the hook is spelled tokenreduce_register)") from exc
    pm.check_pending()
    return pm


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from built-ins and entry points."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry.from_plugin_manager(make_plugin_manager())
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry (it is rebuilt on next use, e.g. after installing a plugin)."""
    global _registry
    with _lock:
        _registry = None


def list_components(kind: str | None = None) -> list[dict[str, str]]:
    """Every registered component as ``{"kind", "name", "origin", "summary"}``, sorted."""
    return [
        {"kind": c.kind, "name": c.name, "origin": c.origin, "summary": c.summary}
        for c in get_registry().components(kind)
    ]
