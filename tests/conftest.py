"""Shared test setup: make tests/ importable (the oracle lives in tests/oracle.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
