"""The layering (CONTRIBUTING.md): core imports neither strategies nor adapters; strategies and adapters depend on
core only (never on each other)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "tokenreduce"
FORBIDDEN = {
    "core": ("tokenreduce.strategies", "tokenreduce.adapters", "tokenreduce.api", "tokenreduce.cli"),
    "strategies": ("tokenreduce.adapters",),
    "adapters": ("tokenreduce.strategies",),
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layering(layer):
    offenders = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                offenders.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)
