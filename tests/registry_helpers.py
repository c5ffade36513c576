"""A registry with the built-ins plus test-only components (e.g. recording wrappers)."""

from __future__ import annotations

import types

from tokenreduce.core.registry import Registry, hookimpl, make_plugin_manager


def registry_with(name: str, scorers: dict | None = None, selectors: dict | None = None) -> Registry:
    """Built-ins (no entry points) plus a test plugin ``test:<name>`` registering the given classes."""
    plugin = types.ModuleType(f"test_{name}_plugin")

    @hookimpl
    def tokenreduce_register(registry):
        for key, cls in (scorers or {}).items():
            registry.scorer(key, cls)
        for key, cls in (selectors or {}).items():
            registry.selector(key, cls)

    plugin.tokenreduce_register = tokenreduce_register
    pm = make_plugin_manager(entry_points=False)
    pm.register(plugin, name=f"test:{name}")
    return Registry.from_plugin_manager(pm)
