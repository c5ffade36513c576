"""Import a repository script (``scripts/``, ``benchmarks/``) as a module in tests, once."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def load_script(relative: str) -> ModuleType:
    """The module of ``REPO / relative`` (e.g. ``"scripts/reference_presets.py"``), executed once and
    registered in ``sys.modules`` under its stem (its dataclasses look their module up by name)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
