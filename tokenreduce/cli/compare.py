"""``tokenreduce compare RUN_DIR... [--out DIR] [--metric accuracy|retention]``: several ``eval``
runs in one leaderboard (Markdown + CSV) and one accuracy-vs-cost plot (docs/cli.md)."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreduce.cli.output import jsonable, output_folder
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.plots import METRICS, method_labels, method_of, plot_accuracy_cost

__all__ = ["Run", "cmd_compare", "leaderboard", "load_run"]

#: leaderboard columns: header, key of the row dict, format ("si": SI prefix, "%": percent)
_COLUMNS = (
    ("#", "rank", "{}"),
    ("run", "run", "{}"),
    ("task", "task", "{}"),
    ("config", "config", "{}"),
    ("method", "method", "{}"),
    ("layer avg", "layer_average", "{:.1f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("retention", "retention", "%"),
    ("1st-tok agree", "first_token_agreement", "{:.3f}"),
    ("1st-tok KL", "first_token_kl", "{:.4f}"),
    ("FLOPs true", "flops_true", "si"),
    ("FLOPs paper", "flops_paper", "si"),
    ("KV MiB", "kv_mib", "{:.2f}"),
    ("ms/question", "ms_per_example", "{:.2f}"),
)


@dataclass
class Run:
    """One ``eval`` output folder: its label (model name and folder), task and metrics."""

    label: str
    folder: Path
    model: str
    task: str
    metrics: list[dict[str, Any]]


def _task_label(task: dict[str, Any]) -> str:
    return f"{task.get('name', '?')} {task.get('split', '?')} n={task.get('n', '?')} seed={task.get('seed', '?')}"


def load_run(folder: str | Path) -> Run:
    """Read ``folder/results.json`` of a ``tokenreduce eval`` run (label: ``<model> (<folder name>)``)."""
    path = Path(folder)
    if not path.exists():
        raise TokenReduceError(f"RUN_DIR {str(folder)!r} does not exist")
    if not path.is_dir():
        raise TokenReduceError(f"RUN_DIR {str(folder)!r} is not a directory (give the folder holding results.json)")
    file = path / "results.json"
    if not file.is_file() and (path / "shards").is_dir():
        raise TokenReduceError(
            f"RUN_DIR {str(folder)!r} holds the shard files of a sharded eval but no results.json yet: merge them "
            f"first with tokenreduce eval eval.merge={folder} (docs/scaling.md)"
        )
    if not file.is_file():
        raise TokenReduceError(
            f"RUN_DIR {str(folder)!r} has no results.json (an eval output folder holds config.yaml, results.json, "
            "results.md)"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TokenReduceError(f"{file}: not valid JSON ({exc})") from None
    command = (data.get("meta") or {}).get("command") if isinstance(data, dict) else None
    if command != "eval":
        raise TokenReduceError(
            f"{file} was written by 'tokenreduce {command}'; compare reads the results of 'tokenreduce eval'"
            if command
            else f"{file} is not a tokenreduce eval result (no meta.command)"
        )
    metrics = data.get("metrics")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, dict) and "name" in m for m in metrics):
        raise TokenReduceError(f"{file}: 'metrics' must be a non-empty list of configurations with a 'name'")
    model = str((data.get("model") or {}).get("name") or "?")
    return Run(
        label=f"{model} ({path.resolve().name})",
        folder=path,
        model=model,
        task=_task_label(data.get("task") or {}),
        metrics=metrics,
    )


def _unique_labels(runs: list[Run]) -> None:
    """Make run labels unique: ``<model> (<folder name>)``, else ``<model> (<folder as given>)``."""
    seen: dict[Path, str] = {}
    for run in runs:
        resolved = run.folder.resolve()
        if resolved in seen:
            raise TokenReduceError(f"RUN_DIR {str(run.folder)!r} is given twice (also as {seen[resolved]!r})")
        seen[resolved] = str(run.folder)
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.model} ({run.folder})"


def leaderboard(runs: Sequence[Run], metric: str = "accuracy") -> list[dict[str, Any]]:
    """One row per configuration of every run, best ``metric`` first (ties: fewer FLOPs first).

    ``method`` is labelled as in the plot (a word prefix shared by every method is dropped).
    Retention is recomputed as accuracy / the run's vanilla accuracy (``None`` when undefined)."""
    if metric not in METRICS:
        raise TokenReduceError(f"--metric must be one of {', '.join(METRICS)}; got {metric!r}")
    rows = []
    for run in runs:
        base = next((m for m in run.metrics if m.get("name") == "vanilla" and not m.get("plan")), None)
        base_acc = base.get("accuracy") if base else None
        for m in run.metrics:
            acc = m.get("accuracy")
            is_vanilla = m is base
            rows.append(
                {
                    "run": run.label,
                    "model": run.model,
                    "folder": str(run.folder),
                    "task": run.task,
                    "config": m["name"],
                    "method": None if is_vanilla else method_of(str(m["name"]), m.get("plan")),  # labelled below
                    "layer_average": m.get("layer_average"),
                    "accuracy": acc,
                    "retention": acc / base_acc if acc is not None and base_acc else None,
                    "first_token_agreement": m.get("first_token_agreement"),
                    "first_token_kl": m.get("first_token_kl"),
                    "flops_true": m.get("flops_true"),
                    "flops_paper": m.get("flops_paper"),
                    "kv_mib": m.get("kv_mib"),
                    "ms_per_example": m.get("ms_per_example"),
                }
            )
    rows.sort(
        key=lambda r: (
            r[metric] is None,
            -(r[metric] or 0.0),
            r["flops_true"] is None,
            r["flops_true"] or 0.0,
        )
    )
    labels = method_labels([r["method"] for r in rows if r["method"] is not None])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        row["method"] = "vanilla" if row["method"] is None else labels[row["method"]]
    return rows


def _cell(value: Any, fmt: str) -> str:
    from tokenreduce.measure.latency import format_si

    if value is None:
        return "-"
    if fmt == "si":
        return format_si(value)
    if fmt == "%":
        return f"{value:.1%}"
    return fmt.format(value)


def _markdown(rows: list[dict[str, Any]], runs: Sequence[Run], metric: str, notes: list[str]) -> str:
    header = [c[0] for c in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r[key], fmt) for _, key, fmt in _COLUMNS) + " |" for r in rows]
    head = f"# Leaderboard: {len(runs)} run(s), by {metric}\n\n"
    head += "".join(f"- {r.label}: `{r.folder}`, {r.task}\n" for r in runs) + "\n"
    head += (
        "Retention: accuracy / the run's vanilla accuracy. FLOPs: mean prefill FLOPs per question "
        "(docs/measurement.md). ms/question: wall time of the configuration's generate() calls per question.\n\n"
    )
    tail = "\n\nNotes:" + "".join(f"\n- {n}" for n in notes) if notes else ""
    return head + "\n".join(lines) + tail + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = ["rank", "run", "model", "folder", "task", "config", "method"] + [
        key for _, key, _ in _COLUMNS if key not in ("rank", "run", "task", "config", "method")
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreduce compare",
        description="Merge the results.json of several `tokenreduce eval` runs into one leaderboard "
        "(leaderboard.md, leaderboard.csv) and one accuracy-vs-cost plot (accuracy_cost.png, .svg).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of tokenreduce eval")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default outputs/compare/<date>_<time>)"
    )
    parser.add_argument(
        "--metric",
        default="accuracy",
        choices=METRICS,
        help="ranking and y axis: accuracy, or retention (accuracy / the run's vanilla accuracy)",
    )
    return parser


def cmd_compare(argv: Sequence[str]) -> int:
    """``compare``: read every RUN_DIR, print the leaderboard, write it with the plot into ``--out``."""
    args = _parser().parse_args(list(argv))
    runs = [load_run(d) for d in args.runs]
    _unique_labels(runs)
    notes = []
    tasks = list(dict.fromkeys(r.task for r in runs))
    if len(tasks) > 1:
        notes.append(f"the runs evaluate different tasks ({'; '.join(tasks)}): compare their rows with care")
    if args.metric == "retention":
        for run in runs:
            base = next((m for m in run.metrics if m.get("name") == "vanilla" and not m.get("plan")), None)
            if base is None or not base.get("accuracy"):
                notes.append(f"{run.label}: no vanilla accuracy > 0, so its retention is undefined ('-')")
    rows = leaderboard(runs, args.metric)
    folder = output_folder("compare", args.out)
    written = ["leaderboard.md", "leaderboard.csv"]
    try:
        plot = plot_accuracy_cost(
            [(r.label, r.metrics) for r in runs],
            folder / "accuracy_cost",
            metric=args.metric,
            title=f"{args.metric} against cost: " + ", ".join(r.label for r in runs),
        )
    except TokenReduceError as exc:
        notes.append(f"no plot: {exc}")
    else:
        written += [p.name for p in plot.files]
    (folder / "leaderboard.md").write_text(_markdown(rows, runs, args.metric, notes))
    _write_csv(folder / "leaderboard.csv", rows)
    meta = {"command": "compare", "created": _dt.datetime.now().isoformat(timespec="seconds")}
    results = {
        "meta": meta,
        "metric": args.metric,
        "runs": [{"label": r.label, "folder": str(r.folder), "model": r.model, "task": r.task} for r in runs],
        "rows": rows,
        "notes": notes,
    }
    (folder / "results.json").write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    from tokenreduce.measure.latency import format_table

    print(format_table([[_cell(r[key], fmt) for _, key, fmt in _COLUMNS] for r in rows], [c[0] for c in _COLUMNS]))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(folder / f) for f in [*written, 'results.json'])}")
    return 0
