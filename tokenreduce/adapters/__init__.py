"""Adapters: the only code that touches a model.  One folder per architecture (its adapter, its
:class:`~tokenreduce.core.arch.ArchSpec`, its tiny test model), plus the shared cut engine
(:mod:`.cut`), masks (:mod:`.masks`) and signals (:mod:`.llama_signals`, :mod:`.vision_signals`).
See ``docs/writing-an-adapter.md``.

Built-in architectures register through the same pluggy hook as third-party ones.  The hook
finds them itself: every subpackage of this folder whose ``__init__`` exports ``SPEC`` (an
:class:`~tokenreduce.core.arch.ArchSpec` subclass) is registered, in folder-name order, so adding
an architecture is adding its folder.
"""

import importlib
import pkgutil

from tokenreduce.core.registry import hookimpl


def architecture_folders() -> list[str]:
    """The names of the subpackages of :mod:`tokenreduce.adapters`, sorted."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


@hookimpl
def tokenreduce_register(registry) -> None:
    for name in architecture_folders():
        spec = getattr(importlib.import_module(f"{__name__}.{name}"), "SPEC", None)
        if spec is not None:
            registry.architecture(spec())
