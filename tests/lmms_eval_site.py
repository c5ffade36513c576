"""lmms-eval's package, installed for the tests that drive the lmms-eval bridge: one ``lmms_eval``
fixture, loaded by ``tests/conftest.py`` for ``tests/integrations`` and ``tests/plugins``.

lmms-eval declares torchvision (no CPU wheel here), datasets, decord and dozens more as hard
dependencies, none of which its model interface needs, so the fixture installs the published
wheel with ``pip install --no-deps --target`` into a temporary folder, with the two packages its
model registry and base class import, and puts the folder on ``sys.path`` for the module's tests.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

LMMS_EVAL = "lmms-eval==0.7.3"
#: what lmms_eval.models and lmms_eval.api.model import beyond tokenreduce's own dependencies
LMMS_EVAL_IMPORTS = ["loguru==0.7.3", "pytz==2026.6"]


@pytest.fixture(scope="module")
def lmms_eval(tmp_path_factory):
    """lmms-eval's package (no dependencies) importable for this module's tests."""
    target = tmp_path_factory.mktemp("lmms-eval-site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        str(target),
        LMMS_EVAL,
        *LMMS_EVAL_IMPORTS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (the package index must be reachable):\n{proc.stderr[-2000:]}"
    sys.path.insert(0, str(target))
    try:
        import lmms_eval.models  # noqa: F401  (builds its registry, entry points included)

        yield importlib.import_module("lmms_eval")
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith(("lmms_eval.", "loguru", "pytz"))]:
            del sys.modules[name]
        sys.modules.pop("tokenreduce.integrations.lmms_eval_plugin", None)
