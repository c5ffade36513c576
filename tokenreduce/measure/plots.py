"""Accuracy against cost: one line per method across its budgets, vanilla marked (docs/cli.md).

``tokenreduce eval`` (one run) and ``tokenreduce compare`` (several runs) draw the same figure:
two panels with the same y axis, accuracy or retention (accuracy / the run's vanilla accuracy),
against the mean prefill FLOPs per question (true convention, docs/measurement.md) and against
the measured wall time per question.  Every configuration of a run belongs to a **method**
(:func:`method_of`): the preset family of its name (``ref_pio_11``, ``ref_pio_22`` and
``ref_pio_33`` are three budgets of ``ref_pio``), or, for a name without a budget suffix, the
scorers and selectors of its plan's stages.  A word prefix shared by every method of the figure
(``ref_``) is dropped from the labels.  Vanilla is drawn as a star with a dashed line at its
value.

:func:`accuracy_cost_series` returns exactly what is drawn, so tests check the series from the
data without reading pixels; :func:`plot_accuracy_cost` draws them with matplotlib's Agg canvas
(no display, no pyplot state) and writes a PNG and an SVG.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenreduce.core.errors import TokenReduceError

__all__ = [
    "METRICS",
    "Point",
    "Series",
    "PlotData",
    "method_of",
    "method_labels",
    "accuracy_cost_series",
    "plot_accuracy_cost",
]

METRICS = ("accuracy", "retention")
VANILLA = "vanilla"

_BUDGET = re.compile(r"^(?P<family>.+?)_(?P<budget>\d+(?:\.\d+)?)$")


@dataclass
class Point:
    """One configuration: ``value`` is the plotted metric; ``flops`` the mean true prefill FLOPs
    per question, ``ms`` the wall milliseconds per question (``None`` where unknown)."""

    config: str
    value: float
    flops: float | None
    ms: float | None
    layer_average: float | None = None


@dataclass
class Series:
    """A method's points in one run, ordered by FLOPs (then time), as drawn."""

    run: str
    method: str
    points: list[Point] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.run}: {self.method}" if self.run else self.method


@dataclass
class PlotData:
    """What :func:`plot_accuracy_cost` drew: the metric, each run's vanilla point, the series, the
    files, and ``drawn``: per panel (``"flops"``, ``"ms"``), legend label -> the ``(x, y)`` lists
    handed to matplotlib."""

    metric: str
    vanilla: dict[str, Point]
    series: list[Series]
    files: list[Path] = field(default_factory=list)
    drawn: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)


def _component_name(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        name = entry.get("name")
        return str(name) if name is not None else None
    return None


def method_of(name: str, plan: Mapping[str, Any] | None = None) -> str:
    """The method a configuration belongs to: the part of ``name`` before a trailing ``_<number>``
    budget (``ref_pio_ve_33`` -> ``ref_pio_ve``); for a name without one, the plan's stages as
    ``scorer+selector`` joined by ``" > "`` (``vision_cls+visionzip > pio+nms``); else ``name``."""
    match = _BUDGET.match(name)
    if match:
        return match["family"]
    stages = (plan or {}).get("stages") or []
    parts = []
    for stage in stages:
        names = [n for n in (_component_name(stage.get("scorer")), _component_name(stage.get("selector"))) if n]
        parts.append("+".join(names) or f"layer {stage.get('layer')}")
    return " > ".join(parts) if parts else name


def method_labels(methods: Sequence[str]) -> dict[str, str]:
    """``method -> label``: a ``word_`` prefix shared by every method (when there are >= 2 distinct
    methods and nothing becomes empty) is dropped."""
    distinct = sorted(set(methods))
    if len(distinct) < 2:
        return {m: m for m in distinct}
    first = distinct[0].split("_")[0] + "_"
    if all(m.startswith(first) and len(m) > len(first) for m in distinct):
        return {m: m[len(first) :] for m in distinct}
    return {m: m for m in distinct}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def accuracy_cost_series(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], metric: Literal["accuracy", "retention"] = "accuracy"
) -> tuple[dict[str, Point], list[Series]]:
    """The points of the figure from ``runs``: ``(run label, metrics)`` pairs, where ``metrics`` is
    ``EvalResult.metrics`` (or ``results.json["metrics"]``): dicts with ``name``, ``plan``,
    ``accuracy``, ``flops_true``, ``ms_per_example``, ``layer_average``.

    Retention is recomputed as accuracy / the run's vanilla accuracy; configurations whose value
    is undefined (no vanilla, vanilla accuracy 0) are left out.  Returns ``(vanilla point per run
    label, series)``; series are in order of first appearance.
    """
    if metric not in METRICS:
        raise TokenReduceError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    vanilla: dict[str, Point] = {}
    entries: list[tuple[str, str, Point]] = []
    for run, metrics in runs:
        base = next((m for m in metrics if m.get("name") == VANILLA and not m.get("plan")), None)
        base_acc = _number(base.get("accuracy")) if base else None
        for m in metrics:
            acc = _number(m.get("accuracy"))
            if acc is None:
                continue
            if metric == "accuracy":
                value: float | None = acc
            else:
                value = acc / base_acc if base_acc else None
            if value is None:
                continue
            point = Point(
                config=str(m.get("name")),
                value=value,
                flops=_number(m.get("flops_true")),
                ms=_number(m.get("ms_per_example")),
                layer_average=_number(m.get("layer_average")),
            )
            if m is base:
                vanilla[run] = point
            else:
                entries.append((run, method_of(point.config, m.get("plan")), point))
    labels = method_labels([method for _, method, _ in entries])
    by_key: dict[tuple[str, str], Series] = {}
    for run, method, point in entries:
        key = (run, labels[method])
        by_key.setdefault(key, Series(run=run, method=labels[method])).points.append(point)
    for series in by_key.values():
        series.points.sort(key=lambda p: (p.flops is None, p.flops or 0.0, p.ms or 0.0))
    return vanilla, list(by_key.values())


def _si(value: float, _pos: Any = None) -> str:
    from .latency import format_si

    return format_si(value)


def plot_accuracy_cost(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    path: str | Path,
    metric: Literal["accuracy", "retention"] = "accuracy",
    title: str | None = None,
    dpi: int = 100,
) -> PlotData:
    """Draw the figure of :func:`accuracy_cost_series` and write ``<path>.png`` and ``<path>.svg``
    (``path`` without suffix, or ending in ``.png``/``.svg``).

    Left panel: ``metric`` against the mean prefill FLOPs per question (true convention); right
    panel: against wall milliseconds per question.  Raises :class:`TokenReduceError` when there is
    nothing to draw (e.g. retention with a vanilla accuracy of 0).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    vanilla, series = accuracy_cost_series(runs, metric)
    if not series and not vanilla:
        raise TokenReduceError(
            f"nothing to plot: no configuration has a defined {metric}"
            + (" (retention needs a vanilla run with accuracy > 0)" if metric == "retention" else "")
        )
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".png", ".svg") else path
    stem.parent.mkdir(parents=True, exist_ok=True)

    methods = list(dict.fromkeys(s.method for s in series))
    run_names = list(dict.fromkeys([*vanilla, *(s.run for s in series)]))
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    cmap = _colors(len(methods))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    drawn: dict[str, dict[str, tuple[list[float], list[float]]]] = {"flops": {}, "ms": {}}
    for ax, key, xlabel in (
        (axes[0], "flops", "prefill FLOPs per question (true convention)"),
        (axes[1], "ms", "wall time per question (ms)"),
    ):
        for s in series:
            pts = [p for p in s.points if getattr(p, key) is not None]
            if not pts:
                continue
            r = run_names.index(s.run)
            xs, ys = [getattr(p, key) for p in pts], [p.value for p in pts]
            drawn[key][s.label] = (xs, ys)
            ax.plot(
                xs,
                ys,
                linestyle=styles[r % len(styles)],
                marker=markers[r % len(markers)],
                markersize=4,
                linewidth=1.2,
                color=cmap[methods.index(s.method)],
                label=s.label,
            )
        for run, point in vanilla.items():
            r = run_names.index(run)
            ax.axhline(point.value, color="black", linewidth=0.6, linestyle=styles[r % len(styles)], alpha=0.5)
            x = getattr(point, key)
            if x is not None:
                label = f"{run}: vanilla" if run else "vanilla"
                drawn[key][label] = ([x], [point.value])
                ax.plot([x], [point.value], marker="*", markersize=13, color="black", linestyle="none", label=label)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if key == "flops":
            ax.xaxis.set_major_formatter(FuncFormatter(_si))
    axes[0].set_ylabel(metric + (" (accuracy / vanilla accuracy)" if metric == "retention" else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    files = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(files[0], dpi=dpi)
    fig.savefig(files[1])
    return PlotData(metric=metric, vanilla=vanilla, series=series, files=files, drawn=drawn)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]
