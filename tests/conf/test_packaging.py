"""The installed package must contain every subpackage and the Hydra configs."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_packaged():
    import runpy

    listed = set(runpy.run_path(str(ROOT / "setup.py"))["packages"]())  # not run as __main__: no setup()
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "tokenreduce").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set()
    assert "tokenreduce.conf" in listed


def test_every_config_group_is_shipped_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "tokenreduce.conf"
    ]
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "__pycache__"}
    missing = {g for g in groups if not any(fnmatch.fnmatch(f"{g}/x.yaml", pattern) for pattern in data)}
    assert not missing, f"config groups not shipped as package data: {sorted(missing)}"
