"""The reference-model training code lives outside the package, in the repository's
``tools/reference/``: put the repository root on ``sys.path`` so the tests import it as
``tools.reference``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
