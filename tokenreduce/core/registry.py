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

Names are ``lower_snake``; each ``(kind, name)`` may be registered once.  A component is checked
when it is registered: a class with a pydantic ``Settings`` model, a scorer with its own
``score()``, a selector with its own ``select()``.  Unknown names raise listing the known ones;
duplicates name both origins.

A broken third-party plugin (its entry point does not import, its hook is misspelled or raises,
or it registers a component that breaks the contract or a name that is taken) is *set aside*: the
built-ins and the healthy plugins stay usable, :func:`broken_plugins` and ``tokenreduce list``
show it with its error, and that error is raised when a plan names one of its components.  With
the environment variable ``TOKENREDUCE_STRICT_PLUGINS=1`` the first broken plugin fails every use
of the registry instead.  A built-in that fails to register always raises.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

from .arch import ArchSpec
from .conf import did_you_mean, reset_plugin_conf
from .errors import (
    DuplicateComponentError,
    PluginLoadError,
    RegistrationError,
    TokenReduceError,
    UnknownComponentError,
    UnsupportedModelError,
)
from .strategy import Scorer, Selector

PROJECT = "tokenreduce"
ENTRY_POINT_GROUP = "tokenreduce"
KINDS = ("scorer", "selector", "adapter", "architecture")
#: modules whose ``tokenreduce_register`` hook provides the built-in components
BUILTIN_PLUGINS = ("tokenreduce.strategies", "tokenreduce.adapters")
#: plugin names starting with this are built-ins: they are never set aside
BUILTIN_PREFIX = "builtin:"
#: ``1``: a broken plugin fails every use of the registry (fail fast) instead of being set aside
STRICT_ENV = "TOKENREDUCE_STRICT_PLUGINS"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: what a scorer / selector must define itself (the base classes only declare a stub)
_CONTRACT = {
    "scorer": ("score", Scorer, "score(view) -> [B, N] float scores, higher = keep"),
    "selector": ("select", Selector, "select(view, scores, keep) -> Selection"),
}

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def strict_plugins() -> bool:
    """Whether ``TOKENREDUCE_STRICT_PLUGINS`` asks for fail-fast plugin loading."""
    raw = os.environ.get(STRICT_ENV, "")
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise TokenReduceError(
        f"environment variable {STRICT_ENV}={raw!r} is not understood; allowed: 1 (a broken plugin is an "
        "error) or 0 (a broken plugin is set aside, the default)"
    )


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


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin set aside because it failed to load or to register its components."""

    #: the plugin's name, as its components' ``origin`` would read
    origin: str
    #: the entry point's name (or the plugin's name when it was not loaded from an entry point)
    plugin: str
    #: ``"<name> <version>"`` of the installed distribution ("" when not from an entry point)
    distribution: str
    #: what went wrong (raised again when a plan names one of its components)
    error: TokenReduceError
    #: the ``(kind, name)`` s it registered or tried to register, as far as they are known
    components: tuple[tuple[str, str], ...] = ()
    #: whether ``components`` is all of them (False: it failed before or while registering)
    complete: bool = False

    @property
    def message(self) -> str:
        return str(self.error)


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager plus the entry points set aside because they failed to load."""

    def __init__(self, project_name: str = PROJECT) -> None:
        super().__init__(project_name)
        #: entry points that failed to import or to register their hook (not registered here)
        self.broken: list[BrokenPlugin] = []
        #: plugin name -> (entry point name, distribution label), for entry-point plugins
        self.sources: dict[str, tuple[str, str]] = {}


class Registrar:
    """Handed to each plugin's ``tokenreduce_register``; checks and stages its entries, which the
    registry takes all at once when the hook returns without a problem."""

    def __init__(self, registry: Registry, origin: str, *, strict: bool = True):
        self._registry = registry
        self._origin = origin
        self._strict = strict
        self.staged: dict[tuple[str, str], Component] = {}
        #: every (kind, name) the plugin asked for, valid or not, in order
        self.attempted: list[tuple[str, str]] = []
        #: what was wrong with its registrations (not strict: collected instead of raised)
        self.errors: list[TokenReduceError] = []
        #: names already held by another third-party plugin: (kind, name) -> the error
        self.clashes: dict[tuple[str, str], DuplicateComponentError] = {}

    def _stage(self, kind: str, name: Any, cls: Any, settings: Any, spec: Any = None, *, check: bool = True) -> None:
        key = (kind, name if isinstance(name, str) else repr(name))
        self.attempted.append(key)
        try:
            comp = self._registry._check(kind, name, cls, settings, self._origin, spec, staged=self.staged)
        except TokenReduceError as exc:
            if isinstance(exc, DuplicateComponentError) and key in self._registry._entries:
                if not self._registry._entries[key].origin.startswith(BUILTIN_PREFIX):
                    self.clashes[key] = exc
            if self._strict:
                raise
            self.errors.append(exc)
            return
        self.staged[key] = comp

    def scorer(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._stage("scorer", name, cls, settings)

    def selector(self, name: str, cls: type, settings: type[BaseModel] | None = None) -> None:
        self._stage("selector", name, cls, settings)

    def architecture(self, spec: ArchSpec) -> None:
        """Register an architecture: its :class:`~tokenreduce.core.arch.ArchSpec` instance, under
        ``spec.model_type``, and its adapter (``spec.adapter``) under the same name."""
        problem = None
        if not isinstance(spec, ArchSpec):
            problem = (
                f"architecture from {self._origin}: expected an ArchSpec instance, got {spec!r} "
                "(subclass tokenreduce.core.arch.ArchSpec and register an instance)"
            )
        elif spec.adapter is None:
            problem = f"architecture {spec.model_type!r} from {self._origin}: its ArchSpec names no adapter"
        if problem is not None:
            name = getattr(spec, "model_type", None)
            self.attempted.append(("architecture", name if isinstance(name, str) else repr(spec)))
            if self._strict:
                raise RegistrationError(problem)
            self.errors.append(RegistrationError(problem))
            return
        self._stage("architecture", spec.model_type, type(spec), _NoSettings, spec=spec)
        self._stage("adapter", spec.model_type, spec.adapter, _adapter_settings(spec.adapter))

    def adapter(self, name: str, cls: type) -> None:
        """Register an adapter without an architecture spec (deprecated: prefer
        :meth:`architecture`; the loader, FLOPs, viz and lmms-eval cannot serve it)."""
        self._stage("adapter", name, cls, _adapter_settings(cls))


class _NoSettings(BaseModel, extra="forbid"):
    pass


def _adapter_settings(cls: Any) -> type[BaseModel]:
    settings = getattr(cls, "Settings", None)
    return settings if isinstance(settings, type) and issubclass(settings, BaseModel) else _NoSettings


def _check_kind(kind: Any, where: str) -> None:
    if kind not in KINDS:
        raise UnknownComponentError(f"{where}(kind={kind!r}): unknown component kind; allowed: {', '.join(KINDS)}")


def _class_name(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


def _contract_problem(kind: str, cls: type) -> str | None:
    """What a scorer / selector class lacks of the contract (None: nothing)."""
    if kind not in _CONTRACT:
        return None
    method, base, signature = _CONTRACT[kind]
    found = getattr(cls, method, None)
    if callable(found) and found is not getattr(base, method):
        return None
    if found is getattr(base, method):
        why = f"has no {method}() of its own (it inherits the stub of tokenreduce.{base.__name__}, which only raises)"
    else:
        why = f"has no {method}() method"
    other = next(k for k in _CONTRACT if k != kind)
    other_method, other_base, _ = _CONTRACT[other]
    found_other = getattr(cls, other_method, None)
    hint = ""
    if callable(found_other) and found_other is not getattr(other_base, other_method):
        hint = f"; it defines {other_method}(): register it with registry.{other}(...)"
    return f"{why}{hint}; a {kind} must define {signature} (docs/writing-a-strategy.md)"


class Registry:
    """Name table ``(kind, name) -> Component``, populated from a pluggy plugin manager."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Component] = {}
        self._broken: list[BrokenPlugin] = []
        #: names two third-party plugins both registered: looking them up raises this error
        self._conflicts: dict[tuple[str, str], DuplicateComponentError] = {}

    # -- population ---------------------------------------------------------------------------
    def _check(
        self,
        kind: str,
        name: Any,
        cls: Any,
        settings: Any,
        origin: str,
        spec: Any = None,
        staged: dict[tuple[str, str], Component] | None = None,
    ) -> Component:
        """The entry for one registration, or the error that says what is wrong with it."""
        if kind not in KINDS:
            raise RegistrationError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistrationError(f"{kind} name {name!r} from {origin} must be lower_snake ([a-z][a-z0-9_]*)")
        if not isinstance(cls, type):
            raise RegistrationError(
                f"{kind} {name!r} from {origin}: expected a class, got {cls!r} (register the class, not an object)"
            )
        settings = settings if settings is not None else getattr(cls, "Settings", None)
        if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
            raise RegistrationError(
                f"{kind} {name!r} from {origin}: class {_class_name(cls)} needs a pydantic Settings model "
                "(cls.Settings, a pydantic BaseModel; or base the class on tokenreduce.Scorer / Selector)"
            )
        problem = _contract_problem(kind, cls)
        if problem is not None:
            raise RegistrationError(f"{kind} {name!r} from {origin}: class {_class_name(cls)} {problem}")
        key = (kind, name)
        other = self._entries.get(key) or (staged or {}).get(key)
        if other is not None:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by {other.origin} and by {origin}; "
                "rename one of them or uninstall one plugin"
            )
        return Component(kind, name, cls, settings, origin, spec)

    def _add(
        self, kind: str, name: str, cls: type, settings: type[BaseModel] | None, origin: str, spec: Any = None
    ) -> None:
        """Check and add one entry (raises what :meth:`_check` finds)."""
        comp = self._check(kind, name, cls, settings, origin, spec)
        self._entries[(kind, name)] = comp

    def _set_aside(self, broken: BrokenPlugin, clashes: dict[tuple[str, str], DuplicateComponentError]) -> None:
        self._broken.append(broken)
        self._conflicts.update(clashes)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager, *, strict: bool | None = None) -> Registry:
        """Call every registered plugin's hook, each with a registrar that knows its origin.

        A plugin whose hook raises or registers something invalid is set aside (:attr:`broken`)
        with none of its entries kept, unless ``strict`` (default: ``TOKENREDUCE_STRICT_PLUGINS``)
        or the plugin is a built-in: then the error is raised."""
        strict = strict_plugins() if strict is None else strict
        registry = cls()
        registry._broken.extend(getattr(pm, "broken", ()))
        sources: dict[str, tuple[str, str]] = getattr(pm, "sources", {})
        named = [(n, p) for n, p in pm.list_name_plugin() if p is not None]
        # built-ins first, so a third-party plugin can never take a built-in's name
        for origin, plugin in sorted(named, key=lambda np: not np[0].startswith(BUILTIN_PREFIX)):
            if getattr(plugin, "tokenreduce_register", None) is None:
                continue
            fail_fast = strict or origin.startswith(BUILTIN_PREFIX)
            registrar = Registrar(registry, origin, strict=fail_fast)
            ep_name, dist = sources.get(origin, (origin, ""))
            try:
                # call the hook of this plugin alone, so every entry carries its own origin
                pm.subset_hook_caller("tokenreduce_register", remove_plugins=[p for _, p in named if p is not plugin])(
                    registry=registrar
                )
            except Exception as exc:
                if origin.startswith(BUILTIN_PREFIX):
                    raise  # a built-in's failure is tokenreduce's own bug: never set aside
                error: TokenReduceError
                if isinstance(exc, TokenReduceError):
                    if fail_fast:
                        raise
                    error = exc
                else:  # the plugin's own failure, named with the plugin
                    error = PluginLoadError(
                        f"plugin {origin} failed while registering its components: {type(exc).__name__}: {exc}"
                    )
                    if fail_fast:
                        raise error from exc
                    error.__cause__ = exc
                registry._set_aside(
                    BrokenPlugin(origin, ep_name, dist, error, tuple(registrar.attempted), complete=False),
                    registrar.clashes,
                )
                continue
            if registrar.errors:
                error = registrar.errors[0]
                if len(registrar.errors) > 1:
                    error = type(error)("; ".join(str(e) for e in registrar.errors))
                registry._set_aside(
                    BrokenPlugin(origin, ep_name, dist, error, tuple(registrar.attempted), complete=True),
                    registrar.clashes,
                )
                continue
            registry._entries.update(registrar.staged)
        return registry

    # -- lookup -------------------------------------------------------------------------------
    @property
    def broken(self) -> list[BrokenPlugin]:
        """The plugins set aside (their components are not registered), in load order."""
        return list(self._broken)

    def get(self, kind: str, name: str, *, context: str = "") -> Component:
        """The entry ``(kind, name)``.

        Raises:
            UnknownComponentError: no such entry (the message lists the known names of ``kind``
                and the errors of plugins set aside whose components are not known).
            PluginLoadError, RegistrationError, DuplicateComponentError: the entry belongs to a
                plugin that was set aside (its error), or two plugins registered the name.
        """
        _check_kind(kind, "Registry.get")
        key = (kind, name)
        where = f" (at {context})" if context else ""
        if key in self._conflicts:
            raise DuplicateComponentError(f"{kind} {name!r}{where} is ambiguous: {self._conflicts[key]}")
        comp = self._entries.get(key)
        if comp is not None:
            return comp
        for broken in self._broken:
            if key in broken.components:
                err = type(broken.error)(
                    f"{kind} {name!r}{where} is unavailable: it comes from plugin {broken.origin}, which was set "
                    f"aside because: {broken.error}"
                )
                raise err from broken.error
        known = sorted(n for k, n in self._entries if k == kind)
        message = f"unknown {kind} {name!r}{where}; known {kind}s: {', '.join(known) or '(none)'}"
        suggestion = did_you_mean(name, known)
        if suggestion:
            message += f"; {suggestion}"
        unknown_parts = [b for b in self._broken if not b.complete]
        if unknown_parts:
            message += f". {len(unknown_parts)} plugin(s) failed to load and may provide it: " + "; ".join(
                f"[{b.origin}] {b.error}" for b in unknown_parts
            )
        raise UnknownComponentError(message)

    def names(self, kind: str) -> list[str]:
        _check_kind(kind, "Registry.names")
        return sorted(n for k, n in self._entries if k == kind)

    def components(self, kind: str | None = None) -> list[Component]:
        if kind is not None:
            _check_kind(kind, "Registry.components")
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
    builtins: Iterable[tuple[str, Any]] | None = None, entry_points: bool = True, *, strict: bool | None = None
) -> PluginManager:
    """A plugin manager with the built-in plugins and (optionally) the ``tokenreduce`` entry points.

    An entry point that fails to import, defines no hook or a misspelled one is left out and
    recorded in ``pm.broken``, unless ``strict`` (default: ``TOKENREDUCE_STRICT_PLUGINS``): then
    it raises :class:`~tokenreduce.core.errors.PluginLoadError`."""
    strict = strict_plugins() if strict is None else strict
    pm = PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    if builtins is None:  # built-ins register like everyone else, by module name (as pytest does)
        builtins = [(f"{BUILTIN_PREFIX}{name}", importlib.import_module(name)) for name in BUILTIN_PLUGINS]
    for name, module in builtins:
        pm.register(module, name=name)
    pm.check_pending()
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(pm, ep, strict)
    return pm


def _load_entry_point(pm: PluginManager, ep: importlib.metadata.EntryPoint, strict: bool) -> None:
    label = _dist_label(ep)
    name = f"{label} (entry point {ep.name!r})"
    fix = f"Fix or uninstall {label.split(' ')[0]!r}."
    error: PluginLoadError | None = None
    try:
        plugin = ep.load()
    except Exception as exc:  # any import-time failure of a third-party package
        error = PluginLoadError(
            f"plugin entry point {ep.name!r} ({ep.value}) of distribution {label} failed to import: "
            f"{type(exc).__name__}: {exc}. {fix}"
        )
        error.__cause__ = exc
    else:
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
            if not pm.get_hookcallers(plugin):
                error = PluginLoadError(
                    f"plugin {name} ({ep.value}) defines no tokenreduce_register hook: decorate it with "
                    f"tokenreduce.hookimpl. {fix}"
                )
        except (pluggy.PluginValidationError, ValueError) as exc:
            error = PluginLoadError(f"plugin {name}: {exc} (the hook is spelled tokenreduce_register). {fix}")
            error.__cause__ = exc
        if error is not None and pm.get_plugin(name) is plugin:
            pm.unregister(name=name)
    if error is None:
        pm.sources[name] = (ep.name, label)
        return
    if strict:
        raise error
    pm.broken.append(BrokenPlugin(name, ep.name, label, error))


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from built-ins and entry points.

    Plugins that fail to load are set aside with a :class:`RuntimeWarning` (once per build);
    ``TOKENREDUCE_STRICT_PLUGINS=1`` makes them an error instead."""
    global _registry
    with _lock:
        if _registry is None:
            registry = Registry.from_plugin_manager(make_plugin_manager())
            if registry.broken:
                warnings.warn(
                    f"{len(registry.broken)} tokenreduce plugin(s) failed to load and were set aside (their "
                    "components are unavailable; `tokenreduce list` shows them, "
                    f"{STRICT_ENV}=1 makes this an error): "
                    + "; ".join(f"[{b.origin}] {b.error}" for b in registry.broken),
                    RuntimeWarning,
                    stacklevel=2,
                )
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry and the plugins' config folders (both are read again on
    next use, e.g. after installing a plugin)."""
    global _registry
    with _lock:
        _registry = None
    reset_plugin_conf()


def list_components(kind: str | None = None) -> list[dict[str, str]]:
    """Every registered component as ``{"kind", "name", "origin", "summary"}``, sorted.

    Raises:
        UnknownComponentError: ``kind`` is not one of ``scorer``, ``selector``, ``adapter``,
            ``architecture`` (or None for all).
    """
    if kind is not None:
        _check_kind(kind, "list_components")
    return [
        {"kind": c.kind, "name": c.name, "origin": c.origin, "summary": c.summary}
        for c in get_registry().components(kind)
    ]


def broken_plugins() -> list[dict[str, str]]:
    """Every plugin set aside, as ``{"plugin", "distribution", "origin", "error"}``, in load order."""
    return [
        {"plugin": b.plugin, "distribution": b.distribution, "origin": b.origin, "error": b.message}
        for b in get_registry().broken
    ]
