"""The ``tokenreduce`` command.

    tokenreduce demo  [overrides]   apply a plan to a tiny built-in LLaVA and show what it kept
    tokenreduce run   [overrides]   answer a question about an image with `plan` (and without it)
    tokenreduce eval  [overrides]   accuracy and fidelity of vanilla and each plan on a task (easy-VQA)
    tokenreduce bench [overrides]   latency of vanilla and each plan: prefill, TTFT, decode, generate, memory
    tokenreduce flops [overrides]   FLOPs (true and paper conventions) and KV cache of each plan
    tokenreduce viz   [overrides]   PNG of the kept visual tokens, one panel per plan
    tokenreduce list  [out_dir=DIR] registered components and the presets of every config group
    tokenreduce plans [--depth 32] [--visual 576] [name ...]
                                    each plan preset's keep counts and layer average

Overrides are Hydra overrides of ``conf/config.yaml``: ``plan=pio_64``, ``model=llava_1_5_7b``,
``model.text_layers=4``, ``plan.stages.0.keep=32``, ``plans=[pio_64,fastv_64]``,
``bench.repeats=5``, ``task.n=50``, ``out_dir=results/x``.  run/eval/bench/flops/viz write the
resolved, validated ``config.yaml`` and ``results.json`` (plus their own files) into ``out_dir``
(default ``outputs/<command>/<date>_<time>``).  See docs/cli.md.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from tokenreduce.cli.config import (
    PLAN_ENTRY,
    CLIConfig,
    Context,
    DemoSettings,
    FlopsSettings,
    RunSettings,
    SuiteSettings,
    compose_config,
    resolve_plans,
    setup,
)
from tokenreduce.cli.output import out_dir, write_outputs
from tokenreduce.core.errors import TokenReduceError

__all__ = [
    "COMMANDS",
    "PLAN_ENTRY",
    "CLIConfig",
    "Context",
    "DemoSettings",
    "FlopsSettings",
    "RunSettings",
    "SuiteSettings",
    "compose_config",
    "main",
    "one_line",
    "out_dir",
    "resolve_plans",
    "setup",
    "write_outputs",
]

#: command -> (module of tokenreduce.cli, function); modules are imported when their command runs
_HANDLERS = {
    "demo": ("demo", "cmd_demo"),
    "run": ("run", "cmd_run"),
    "eval": ("eval", "cmd_eval"),
    "bench": ("bench", "cmd_bench"),
    "flops": ("flops", "cmd_flops"),
    "viz": ("viz", "cmd_viz"),
    "list": ("listing", "cmd_list"),
    "plans": ("plans", "cmd_plans"),
}
COMMANDS = tuple(_HANDLERS)

log = logging.getLogger("tokenreduce")


class _StderrHandler(logging.Handler):
    """Library warnings to the current ``sys.stderr`` (looked up per record, so captured and
    replaced streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _HANDLERS:
        print(f"tokenreduce: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tokenreduce: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    module, function = _HANDLERS[command]
    handler_fn = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    try:
        return handler_fn(rest)
    except TokenReduceError as exc:
        print(f"tokenreduce {command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file the command reads or writes (disk full, permissions): no traceback
        print(f"tokenreduce {command}: error: {one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return 1


def one_line(message: str) -> str:
    """A possibly multi-line error message on one line: ``header: a; b`` for a header followed by
    one line per field (the pydantic and plan errors)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], "; ".join(lines[1:])
    return f"{head} {rest}" if head.endswith(":") else f"{head}; {rest}"
