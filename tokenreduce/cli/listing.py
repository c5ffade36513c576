"""``tokenreduce list``: registered components and the presets of every config group (docs/cli.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenreduce.cli.output import jsonable
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import format_table

__all__ = ["cmd_list"]


def cmd_list(argv: Sequence[str]) -> int:
    from tokenreduce.core.conf import conf_dir, preset_conflicts, preset_names, preset_origin, preset_path
    from tokenreduce.core.registry import STRICT_ENV, broken_plugins, list_components

    folder = None
    for arg in argv:
        if arg.startswith("out_dir="):
            from tokenreduce.cli.config import check_out_dir

            folder = check_out_dir(arg.split("=", 1)[1] or ".", "list")
        else:
            raise TokenReduceError(f"list takes no overrides except out_dir=DIR; got {arg!r}")
    components = list(list_components())
    rows = [[c["kind"], c["name"], c["origin"], c["summary"]] for c in components]
    print(format_table(rows, ["kind", "name", "origin", "summary"]))
    broken = broken_plugins()
    if broken:  # set aside: their components are unavailable until fixed or uninstalled
        print(f"\nbroken plugins (set aside; their components are unavailable; {STRICT_ENV}=1 makes this an error):")
        table = [[b["distribution"] or "-", b["plugin"], _one_line(b["error"])] for b in broken]
        print(format_table(table, ["distribution", "plugin", "error"]))
    groups = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_"))
    presets: dict[str, list[dict[str, str]]] = {}
    for group in groups:
        entries = []
        for name in preset_names(group):
            path, origin = preset_path(group, name), preset_origin(group, name) or ""
            entries.append({"name": name, "about": _preset_summary(path) if path else "", "origin": origin})
        presets[group] = entries
    for group, entries in presets.items():
        print(f"\n{group} presets (conf/{group} and plugins, use {group}=<name>):")
        table = [
            [e["name"], e["about"] + ("" if e["origin"] == "tokenreduce" else f" [{e['origin']}]")] for e in entries
        ]
        print(format_table(table, ["name", "about"]))
        for name, origins in preset_conflicts(group).items():
            print(f"note: {group} preset {name!r} is defined by {' and '.join(origins)}; the first one is used")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {"components": components, "broken_plugins": broken, "presets": presets}
        (folder / "results.json").write_text(json.dumps(jsonable(data), indent=1) + "\n")
        print(f"wrote {folder / 'results.json'}")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _preset_summary(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "(unreadable)"
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get(path.parent.name), dict):  # a `# @package _global_` conf nests its own group
        data = data[path.parent.name]
    for key in ("description",):
        if data.get(key):
            return str(data[key])
    bits = [f"{k}: {data[k]}" for k in ("kind", "arch", "name", "text_layers") if data.get(k) is not None]
    return ", ".join(bits)
