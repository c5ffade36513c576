"""What the commands write and print: the output folder, ``config.yaml`` + ``results.json``, trace
tables (docs/cli.md)."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from tokenreduce.cli.config import Context

__all__ = [
    "clamp_summary",
    "jsonable",
    "out_dir",
    "output_folder",
    "progress_note",
    "resolved_config",
    "results_meta",
    "trace_dict",
    "trace_rows",
    "write_config",
    "write_outputs",
    "write_results",
]


def out_dir(ctx: Context) -> Path:
    """The command's output folder (created): ``out_dir``, or a fresh ``outputs/<command>/<time>``."""
    return output_folder(ctx.command, ctx.cfg.out_dir)


def output_folder(command: str, given: str | Path | None = None) -> Path:
    """``given`` (created), or a fresh ``outputs/<command>/<date>_<time>`` under the working directory."""
    if given:
        path = Path(given).expanduser()
    else:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        path = Path("outputs") / command / stamp
        n = 1
        while path.exists():
            path = Path("outputs") / command / f"{stamp}-{n}"
            n += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf become None, tensors lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, BaseModel):
        return jsonable(obj.model_dump(mode="json"))
    return obj


def resolved_config(ctx: Context, plans: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``config.yaml`` holds: the validated config, the resolved plans, the chosen presets,
    the overrides and the command (plain JSON values)."""
    resolved = ctx.cfg.model_dump(mode="json")
    if plans is not None:
        resolved["resolved_plans"] = {
            name: p.model_dump(mode="json", exclude_defaults=True) for name, p in plans.items()
        }
    resolved["choices"] = ctx.choices
    resolved["overrides"] = ctx.overrides
    resolved["command"] = ctx.command
    return jsonable(resolved)


def results_meta(ctx: Context) -> dict[str, Any]:
    """``results.json``'s ``meta``: the command, its overrides and presets, versions, the time."""
    from tokenreduce import __version__

    return {
        "command": ctx.command,
        "overrides": ctx.overrides,
        "choices": ctx.choices,
        "tokenreduce": __version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def write_config(folder: Path, resolved: dict[str, Any]) -> None:
    """Write ``folder/config.yaml`` from :func:`resolved_config`."""
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(jsonable(resolved), sort_keys=False, allow_unicode=True))


def write_results(folder: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    """Write ``folder/results.json``: ``meta`` (:func:`results_meta`) and ``results``."""
    (folder / "results.json").write_text(
        json.dumps(jsonable({"meta": meta, **results}), indent=1, allow_nan=False) + "\n"
    )


def write_outputs(ctx: Context, folder: Path, results: dict[str, Any], plans: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (resolved, validated) and ``results.json`` into ``folder``."""
    write_config(folder, resolved_config(ctx, plans))
    write_results(folder, results_meta(ctx), results)


def progress_note(folder: Path, extra: Sequence[str] = ()) -> None:
    """Print the files a command wrote."""
    files = ["config.yaml", "results.json", *extra]
    print(f"wrote {', '.join(str(folder / f) for f in files)}")


def trace_rows(trace, sample: int = 0) -> list[list[str]]:
    """One table row per stage of ``trace`` (sample ``sample``): layer, tokens, visual, ms, kept."""
    rows = []
    for st in trace.stages:
        kept = st.kept[sample]
        shown = ", ".join(map(str, kept[:12])) + (", ..." if len(kept) > 12 else "")
        rows.append(
            [
                str(st.stage),
                str(st.layer),
                f"{st.tokens_before[sample]} -> {st.tokens_after[sample]}",
                f"{st.visual_before[sample]} -> {st.visual_after[sample]}",
                f"{st.seconds * 1e3:.1f}",
                shown,
            ]
        )
    return rows


def clamp_summary(trace) -> dict[str, int]:
    """How many stages and samples of ``trace`` had a keep count clamped (requested != kept)."""
    clamped = trace.clamped()
    return {"stages": len({s for s, _ in clamped}), "samples": len({b for _, b in clamped})}


def trace_dict(trace) -> dict[str, Any]:
    """``trace`` as plain values for ``results.json``; ``requested`` per stage and sample is what
    the stage's keep asked for, ``clamped`` the samples where that differs from ``visual_after``."""
    return {
        "n_layers": trace.n_layers,
        "original_visual": trace.original_visual,
        "visual_per_layer": [trace.visual_per_layer(b) for b in range(len(trace.original_visual))],
        "layer_average": [trace.layer_average(b) for b in range(len(trace.original_visual))],
        "clamped": clamp_summary(trace),
        "stages": [
            {
                "stage": st.stage,
                "layer": st.layer,
                "tokens_before": st.tokens_before,
                "tokens_after": st.tokens_after,
                "visual_before": st.visual_before,
                "requested": st.requested,
                "visual_after": st.visual_after,
                "clamped": st.clamped,
                "seconds": st.seconds,
                "kept": st.kept,
            }
            for st in trace.stages
        ],
    }
