"""``python -m tokenreduce.integrations.vllm MODEL [PLAN]``: print the ``--hf-overrides`` JSON that
serves ``MODEL`` (a checkpoint folder or hub id) with ``PLAN`` (a preset name or a plan's JSON;
none: every visual token) on ``vllm serve`` (docs/vllm.md)."""

from __future__ import annotations

import json
import sys

from tokenreduce.core.errors import TokenReduceError

from . import engine_overrides


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(json.dumps(engine_overrides(args[0], args[1] if len(args) == 2 else None)))
    except (TokenReduceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
