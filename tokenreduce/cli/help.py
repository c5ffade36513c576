"""``tokenreduce -h`` and ``tokenreduce <command> -h``: the commands, and for each command its config
groups (with their presets) and its keys (with their defaults and one line each).

Everything is generated: the keys and their descriptions from the pydantic sections of
:class:`~tokenreduce.cli.config.CLIConfig` (``Field(description=...)``) and the plan models, the
defaults from the composed config (with the overrides given before ``-h``), the presets from the
config groups (built-in and plugins').  A new key or preset shows up here without a second place
to edit (docs/cli.md).
"""

from __future__ import annotations

import json
import re
import textwrap
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["COMMAND_SUMMARIES", "HELP_FLAGS", "command_help", "top_help"]

HELP_FLAGS = ("-h", "--help")

#: command -> (its arguments, one line on what it does); the top-level help lists them in this order
COMMAND_SUMMARIES: dict[str, tuple[str, str]] = {
    "demo": ("[overrides]", "apply a plan to a tiny built-in LLaVA and show what it kept"),
    "run": ("[overrides]", "answer a question about an image with `plan` (and without it)"),
    "eval": ("[overrides]", "accuracy and fidelity of vanilla and each plan on a task (easy-VQA)"),
    "bench": ("[overrides]", "latency of vanilla and each plan: prefill, TTFT, decode, generate, memory"),
    "flops": ("[overrides]", "FLOPs (true and paper conventions) and KV cache of each plan"),
    "viz": ("[overrides]", "PNG of the kept visual tokens, one panel per plan"),
    "list": ("[out_dir=DIR]", "registered components and the presets of every config group"),
    "plans": ("[--depth 32] [--visual 576] [name|file.yaml ...]", "each plan's keep counts and layer average"),
    "compare": ("RUN_DIR...", "merge several runs' results.json into one leaderboard (Markdown, CSV) and plot"),
}

#: command -> the config sections it reads, in the order shown (groups first)
_SECTIONS: dict[str, tuple[str, ...]] = {
    "demo": ("plan", "model", "demo"),
    "run": ("plan", "model", "task", "out_dir", "prompts", "run"),
    "eval": ("plan", "model", "task", "suite", "plans", "out_dir", "prompts", "eval"),
    "bench": ("plan", "model", "task", "plans", "out_dir", "prompts", "bench"),
    "flops": ("plan", "model", "plans", "out_dir", "flops"),
    "viz": ("plan", "model", "task", "plans", "out_dir", "prompts", "viz"),
}
_VALUE_WIDTH = 28


def top_help(commands: Sequence[str]) -> str:
    """The top-level help: usage, one line per command, the override syntax (plain text)."""
    width = max(len(f"{c} {COMMAND_SUMMARIES.get(c, ('', ''))[0]}") for c in commands)
    lines = [
        "usage: tokenreduce <command> [overrides]",
        "       tokenreduce <command> --help    its config groups and keys, with defaults",
        "",
        "commands:",
    ]
    for command in commands:
        args, about = COMMAND_SUMMARIES.get(command, ("", ""))
        lines.append(f"  {f'{command} {args}'.ljust(width)}  {about}")
    lines += [
        "",
        "overrides (Hydra syntax, applied to conf/config.yaml):",
        "  plan=pio_64                     a plan preset (built-in or a plugin's)",
        "  plan=path/to/my_plan.yaml       a plan file, named after its stem",
        "  plan.stages.0.keep=32           change one field of the plan",
        "  plans=[pio_64,fastv_64,plan]    the plans bench/eval/flops/viz compare ('plan': the composed one)",
        "  model=llava_1_5_7b              a model preset; model.text_layers=4 changes one field",
        "  task.n=50  bench.repeats=5      any key of the config; +key=value adds a key",
        "  out_dir=results/x               where run/eval/bench/flops/viz write config.yaml and results.json",
        "                                  (default outputs/<command>/<date>_<time>)",
        "",
        "docs: docs/cli.md",
    ]
    return "\n".join(lines)


def command_help(command: str, overrides: Sequence[str]) -> str:
    """The help of a command that takes overrides: its config groups with the chosen and the
    known presets, then every key it reads with its default (after ``overrides``) and one line."""
    from tokenreduce.cli.config import CLIConfig, compose_config
    from tokenreduce.core.conf import conf_dir, preset_names
    from tokenreduce.core.errors import TokenReduceError

    args, about = COMMAND_SUMMARIES[command]
    lines = [f"usage: tokenreduce {command} {args} [-h]", "", about + "."]
    overrides = list(overrides)
    if command == "demo" and not any(o.lstrip("+~").startswith("model=") for o in overrides):
        from tokenreduce.cli.demo import DEMO_MODEL

        overrides.insert(0, f"model={DEMO_MODEL}")
    try:
        raw, choices = compose_config(overrides)
    except TokenReduceError as exc:  # still show the help, with the plain defaults
        lines += ["", f"(the overrides given do not compose, so the plain defaults are shown: {exc})"]
        raw, choices = compose_config([f"model={DEMO_MODEL}"] if command == "demo" else [])
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}
    fields = CLIConfig.model_fields
    sections = _SECTIONS[command]
    shown_groups = [s for s in sections if s in groups]
    lines += ["", "config groups (group=<preset>; plan also takes a file: plan=path/to/my_plan.yaml):"]
    for group in shown_groups:
        names = preset_names(group)
        lines.append(f"  {group}={choices.get(group, '?')}  {_description(fields[group])}")
        wrapped = textwrap.wrap(", ".join(names), width=96, break_on_hyphens=False)
        lines += [f"      {line}" for line in wrapped]
    lines += ["", "keys (key=value; the value shown is the default with the overrides given):"]
    rows: list[tuple[str, str, str]] = []
    for section in sections:
        value = raw.get(section)
        if section == "plan":
            rows += _plan_rows(value if isinstance(value, dict) else {})
            continue
        annotation = _model_class(fields[section].annotation)
        if annotation is None:
            rows.append((section, _show(value), _description(fields[section])))
            continue
        values = value if isinstance(value, dict) else {}
        for key, field in annotation.model_fields.items():
            shown = _show(values[key]) if key in values else _show_default(field)
            rows.append((f"{section}.{key}", shown, _description(field)))
    lines += _table(rows)
    lines += [
        "",
        "Overrides use Hydra's syntax; +key=value adds a key the config lacks. Command-specific notes, examples and the",
        "files written into out_dir: docs/cli.md. Components (scorers, selectors) and all presets: tokenreduce list.",
    ]
    return "\n".join(lines)


def list_help() -> str:
    """The help of ``tokenreduce list`` (its one key)."""
    args, about = COMMAND_SUMMARIES["list"]
    return "\n".join(
        [
            f"usage: tokenreduce list {args} [-h]",
            "",
            about + ".",
            "",
            "keys:",
            "  out_dir=DIR   also write the listing as JSON into DIR/results.json (created when missing)",
        ]
    )


# -- rows ------------------------------------------------------------------------------------------
def _plan_rows(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``plan.<key>`` rows from the plan models, with the composed plan's values; one group of
    ``plan.stages.<i>.<key>`` rows per stage (or the stage keys once, for a plan without stages)."""
    from tokenreduce.core.plan import Plan, Stage

    rows = []
    for key, field in Plan.model_fields.items():
        if key == "stages":
            stages = plan.get("stages") or []
            rows.append(("plan.stages", f"[{len(stages)} stage(s)]", _description(field)))
            for i, stage in enumerate(stages or [{}]):
                index = i if stages else "<i>"
                for skey, sfield in Stage.model_fields.items():
                    shown = _show(stage[skey]) if skey in stage else _show_default(sfield)
                    rows.append((f"plan.stages.{index}.{skey}", shown, _description(sfield)))
            continue
        shown = _show(plan[key]) if key in plan else _show_default(field)
        rows.append((f"plan.{key}", shown, _description(field)))
    return rows


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    key_width = min(max((len(r[0]) for r in rows), default=0), 36)
    value_width = min(max((len(r[1]) for r in rows), default=0), _VALUE_WIDTH)
    return [f"  {k.ljust(key_width)}  {v.ljust(value_width)}  {d}".rstrip() for k, v, d in rows]


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _show(value: Any) -> str:
    """A value as it is written in an override (JSON-like: null, true, "text", [1, 2]), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _show_default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    if field.default_factory is not None:
        try:
            return _show(field.default_factory())  # type: ignore[call-arg]
        except TypeError:
            return "-"
    default = field.default
    return _show(default.model_dump(mode="json") if isinstance(default, BaseModel) else default)


def _description(field: FieldInfo) -> str:
    """The field's description, else what its type allows; the allowed values of a Literal are
    added when the description does not already name them."""
    text = " ".join((field.description or "").split())
    allowed = _literal_values(field.annotation)
    if allowed and not all(str(v) in text for v in allowed):
        text = f"{text} (one of: {', '.join(map(str, allowed))})" if text else f"one of: {', '.join(map(str, allowed))}"
    if not text:
        text = _type_name(field.annotation)
    return text


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    values: list[Any] = []
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            values += list(typing.get_args(arg))
    return values


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", text).replace("NoneType", "null").replace("None", "null")
