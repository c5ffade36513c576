"""The one registry of scorers, selectors and adapters, fed only through pluggy.

Every component, built-in or third-party, arrives through the same hook::

    from tokenreduce.core.registry import hookimpl

    @hookimpl
    def tokenreduce_register(registry):
        registry.scorer("my_scorer", MyScorer)
        registry.selector("my_selector", MySelector)
        registry.architecture(MyArchSpec())   # an ArchSpec: its adapter, loader, FLOPs, tiny model

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

from .arch import ArchSpec
from .errors import DuplicateComponentError, PluginLoadError, UnknownComponentError, UnsupportedModelError

PROJECT = "tokenreduce"
ENTRY_POINT_GROUP = "tokenreduce"
KINDS = ("scorer", "selector", "adapter", "architecture")
#: modules whose ``tokenreduce_register`` hook provides the built-in components
BUILTIN_PLUGINS = ("tokenreduce.strategies", "tokenreduce.adapters")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    """The plugin hook surface (one hook)."""

    @hookspec
    def tokenreduce_register(self, registry: Registrar) -> None:
        """Register components by calling ``registry.scorer/selector/adapter``."""


@dataclass(frozen=True)
class Component:
    """One registry entry."""

    kind: str
    name: str
    cls: type
    settings: type[BaseModel]
    origin: str
    #: kind "architecture": the registered ArchSpec instance
    spec: Any = None

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


class Registrar:
    """Handed to each plugin's ``tokenreduce_register``; records entries with the plugin's origin."""

    def __init__(self, registry: Registry, origin: str):
        self._registry = registry
        self._origin = origin

    def scorer(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._registry._add("scorer", name, cls, settings, self._origin)

    def selector(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._registry._add("selector", name, cls, settings, self._origin)

    def architecture(self, spec: ArchSpec) -> None:
        """Register an architecture: its :class:`~tokenreduce.core.arch.ArchSpec` instance, under
        ``spec.model_type``, and its adapter (``spec.adapter``) under the same name."""
        if not isinstance(spec, ArchSpec):
            raise TypeError(
                f"architecture from {self._origin}: expected an ArchSpec instance, got {spec!r} "
                "(subclass tokenreduce.core.arch.ArchSpec and register an instance)"
            )
        if spec.adapter is None:
            raise TypeError(f"architecture {spec.model_type!r} from {self._origin}: its ArchSpec names no adapter")
        self._registry._add("architecture", spec.model_type, type(spec), _NoSettings, self._origin, spec=spec)
        self._registry._add("adapter", spec.model_type, spec.adapter, _adapter_settings(spec.adapter), self._origin)

    def adapter(self, name: str, cls: type) -> None:
        """Register an adapter without an architecture spec (deprecated: prefer
        :meth:`architecture`; the loader, FLOPs, viz and lmms-eval cannot serve it)."""
        self._registry._add("adapter", name, cls, _adapter_settings(cls), self._origin)


class _NoSettings(BaseModel, extra="forbid"):
    pass


def _adapter_settings(cls: type) -> type[BaseModel]:
    settings = getattr(cls, "Settings", None)
    return settings if isinstance(settings, type) and issubclass(settings, BaseModel) else _NoSettings


class Registry:
    """Name table ``(kind, name) -> Component``, populated from a pluggy plugin manager."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Component] = {}

    # -- population ---------------------------------------------------------------------------
    def _add(
        self, kind: str, name: str, cls: type, settings: type[BaseModel] | None, origin: str, spec: Any = None
    ) -> None:
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
        self._entries[key] = Component(kind, name, cls, settings, origin, spec)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every registered plugin's hook, each with a registrar that knows its origin."""
        registry = cls()
        for plugin in pm.get_plugins():
            impl = getattr(plugin, "tokenreduce_register", None)
            if impl is None:
                continue
            origin = pm.get_name(plugin) or repr(plugin)
            # call the hook of this plugin alone, so every entry carries its own origin
            pm.subset_hook_caller(
                "tokenreduce_register", remove_plugins=[p for p in pm.get_plugins() if p is not plugin]
            )(registry=Registrar(registry, origin))
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
        """The adapter for ``model_type``: the one an architecture registered under that name,
        else the first adapter class whose ``model_types`` lists it."""
        comp = self._entries.get(("adapter", model_type))
        if comp is not None and ("architecture", model_type) in self._entries:
            return comp
        for comp in self.components("adapter"):
            if model_type in getattr(comp.cls, "model_types", (comp.name,)):
                return comp
        return None

    def model_types(self) -> list[str]:
        """Every ``model_type`` an adapter is registered for, sorted."""
        types = {t for c in self.components("adapter") for t in getattr(c.cls, "model_types", (c.name,))}
        return sorted(types | set(self.names("architecture")))

    def spec_for(self, model_type: str, *, what: str = "") -> ArchSpec:
        """The :class:`~tokenreduce.core.arch.ArchSpec` registered for ``model_type``.

        Raises:
            UnsupportedModelError: none is registered (the message lists the registered ones and,
                when given, ``what`` needed it).
        """
        comp = self._entries.get(("architecture", model_type))
        if comp is not None:
            return comp.spec
        known = self.names("architecture")
        need = f" ({what} needs one)" if what else ""
        adapter_only = " (only an adapter is registered for it, no ArchSpec)" if self.adapter_for(model_type) else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no registered architecture{adapter_only}{need}; "
            f"registered architectures: {', '.join(known) or '(none)'}"
        )

    def specs(self) -> list[ArchSpec]:
        """Every registered architecture spec, sorted by model type."""
        return [c.spec for c in self.components("architecture")]


# -- the process-wide registry ------------------------------------------------------------------
def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return f"{dist.metadata['Name']} {dist.version}"
    return "an unknown distribution"


def make_plugin_manager(
    builtins: Iterable[tuple[str, Any]] | None = None, entry_points: bool = True
) -> pluggy.PluginManager:
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
