"""Deprecated alias: reference-model training moved out of the package, to the repository's
``tools/reference/train.py`` (``python -m tools.reference.train``; ``tools/reference/TRAINING.md``).

``python -m tokenreduce.reference.train ...`` still runs it from a checkout, with a warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Forward to ``tools.reference.train.main`` of the checkout this package sits in (an
    editable install), else of the checkout in the working directory."""
    roots = [Path(__file__).resolve().parents[2], Path.cwd()]
    root = next((r for r in roots if (r / "tools" / "reference" / "train.py").is_file()), None)
    if root is None:
        print(
            "tokenreduce.reference.train moved to tools/reference/train.py of the tokenreduce repository "
            "(not installed): run `python -m tools.reference.train` at the root of a checkout",
            file=sys.stderr,
        )
        return 2
    warnings.warn(
        "`python -m tokenreduce.reference.train` is deprecated: run `python -m tools.reference.train` "
        "at the repository root",
        DeprecationWarning,
        stacklevel=2,
    )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tools.reference.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
