"""The accuracy-vs-cost figure: methods grouped from plan names, series ordered by FLOPs, retention
from the run's vanilla, vanilla marked, PNG and SVG written (tokenreduce.measure.plots)."""

from __future__ import annotations

import pytest
from PIL import Image

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.plots import accuracy_cost_series, method_of, plot_accuracy_cost


def _m(name, acc, flops, ms, plan=None, layer_average=None):
    return {
        "name": name,
        "plan": plan if plan is not None else ({"stages": [{"layer": 1}]} if name != "vanilla" else None),
        "accuracy": acc,
        "flops_true": flops,
        "ms_per_example": ms,
        "layer_average": layer_average,
    }


METRICS = [
    _m("vanilla", 0.8, 300e6, 4.0, layer_average=144.0),
    _m("ref_pio_33", 0.78, 180e6, 3.0),
    _m("ref_fastv_33", 0.76, 150e6, 2.0),
    _m("ref_pio_11", 0.70, 130e6, 2.5),
    _m("ref_fastv_11", 0.60, 100e6, 1.5),
    _m("ref_pio_22", 0.74, 160e6, 2.8),
    _m("ref_pio_ve_22", 0.72, 120e6, None),  # no time: left out of the time panel only
]


def test_method_of_takes_the_preset_family_or_the_plan_stages():
    assert method_of("ref_pio_11") == "ref_pio"
    assert method_of("ref_pio_ve_33") == "ref_pio_ve"
    assert method_of("fastv_64") == "fastv"
    plan = {
        "stages": [
            {"layer": 0, "scorer": {"name": "vision_cls"}, "selector": {"name": "visionzip"}},
            {"layer": 16, "scorer": {"name": "pio"}, "selector": "nms"},
        ]
    }
    assert method_of("visionzip_pio", plan) == "vision_cls+visionzip > pio+nms"
    assert method_of("plan", {"stages": [{"layer": 2}]}) == "layer 2"
    assert method_of("demo") == "demo"


def test_series_group_budgets_by_method_in_flops_order():
    vanilla, series = accuracy_cost_series([("", METRICS)])
    assert vanilla[""].config == "vanilla" and vanilla[""].value == 0.8 and vanilla[""].flops == 300e6
    by_method = {s.method: s for s in series}
    assert list(by_method) == ["pio", "fastv", "pio_ve"]  # shared "ref_" dropped, first-appearance order
    assert [p.config for p in by_method["pio"].points] == ["ref_pio_11", "ref_pio_22", "ref_pio_33"]
    assert [p.value for p in by_method["pio"].points] == [0.70, 0.74, 0.78]
    assert [p.flops for p in by_method["fastv"].points] == [100e6, 150e6]


def test_retention_is_accuracy_over_the_runs_vanilla():
    other = [_m("vanilla", 0.5, 1e6, 1.0), _m("ref_pio_11", 0.25, 0.5e6, 0.5)]
    vanilla, series = accuracy_cost_series([("a", METRICS), ("b", other)], metric="retention")
    assert vanilla["a"].value == pytest.approx(1.0) and vanilla["b"].value == pytest.approx(1.0)
    got = {(s.run, s.method): [p.value for p in s.points] for s in series}
    assert got[("a", "pio")] == pytest.approx([0.70 / 0.8, 0.74 / 0.8, 0.78 / 0.8])
    assert got[("b", "pio")] == pytest.approx([0.5])


def test_the_plot_is_written_with_the_expected_series(tmp_path):
    plot = plot_accuracy_cost([("", METRICS)], tmp_path / "fig", title="t")
    png, svg = plot.files
    assert png == tmp_path / "fig.png" and svg == tmp_path / "fig.svg"
    assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1300, 520)
        assert len(set(im.convert("RGB").getdata())) > 10  # something was drawn
    assert svg.read_text().lstrip().startswith("<?xml")
    flops, ms = plot.drawn["flops"], plot.drawn["ms"]
    assert set(flops) == {"pio", "fastv", "pio_ve", "vanilla"}
    assert flops["pio"] == ([130e6, 160e6, 180e6], [0.70, 0.74, 0.78])
    assert flops["fastv"] == ([100e6, 150e6], [0.60, 0.76])
    assert flops["vanilla"] == ([300e6], [0.8])
    assert ms["pio"] == ([2.5, 2.8, 3.0], [0.70, 0.74, 0.78])
    assert "pio_ve" not in ms  # its only point has no time


def test_several_runs_get_a_line_per_run_and_method(tmp_path):
    plot = plot_accuracy_cost([("x", METRICS), ("y", METRICS[:3])], tmp_path / "two.png")
    assert set(plot.drawn["flops"]) == {
        "x: pio",
        "x: fastv",
        "x: pio_ve",
        "y: pio",
        "y: fastv",
        "x: vanilla",
        "y: vanilla",
    }
    assert plot.drawn["flops"]["y: pio"] == ([180e6], [0.78])


def test_nothing_to_plot_and_bad_metric_are_clear_errors(tmp_path):
    zero = [_m("vanilla", 0.0, 1e6, 1.0), _m("ref_pio_11", 0.0, 0.5e6, 0.5)]
    with pytest.raises(TokenReduceError, match="retention needs a vanilla run with accuracy > 0"):
        plot_accuracy_cost([("", zero)], tmp_path / "z", metric="retention")
    with pytest.raises(TokenReduceError, match="metric must be one of accuracy, retention; got 'f1'"):
        accuracy_cost_series([("", METRICS)], metric="f1")  # type: ignore[arg-type]
