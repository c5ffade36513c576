"""Shared test setup: make tests/ importable (the oracle lives in tests/oracle.py), and run torch
on one thread.

The tests run tiny models whose matmuls are far too small to gain from intra-op threads; with
two threads on a busy 2-core machine one tiny generate() took 5.2 s instead of 0.27 s (measured),
so the whole suite is pinned to one thread.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

# the ``lmms_eval`` fixture (lmms-eval installed without its dependencies), shared by the tests of
# the lmms-eval bridge in tests/integrations and tests/plugins
pytest_plugins = ["lmms_eval_site"]
