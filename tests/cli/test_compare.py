"""``tokenreduce compare``: two eval runs merged into one leaderboard (Markdown + CSV) and one plot;
clear errors for folders that are not eval results."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from tokenreduce.cli import main
from tokenreduce.cli.compare import cmd_compare
from tokenreduce.core.errors import TokenReduceError

FEW = ["task.n=3", "eval.batch_size=3", "eval.max_new_tokens=2", "eval.progress=false", "eval.plot=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real eval runs of the reference model with different plans."""
    root = tmp_path_factory.mktemp("compare")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["eval", *FEW, "plans=[ref_pio_11,ref_fastv_11]", f"out_dir={root / 'a'}"]) == 0
        assert main(["eval", *FEW, "plans=[ref_dart_33]", f"out_dir={root / 'b'}"]) == 0
    return root


def _metrics(folder):
    return json.loads((folder / "results.json").read_text())["metrics"]


def test_compare_merges_two_runs_into_one_leaderboard_and_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cmd_compare([str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "easyvqa-llava (a)" in printed and "easyvqa-llava (b)" in printed
    expected = {("easyvqa-llava (a)", m["name"]): m for m in _metrics(runs / "a")}
    expected |= {("easyvqa-llava (b)", m["name"]): m for m in _metrics(runs / "b")}
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["run"], r["config"]) for r in rows} == set(expected) and len(rows) == 5
    for r in rows:
        m = expected[(r["run"], r["config"])]
        assert float(r["accuracy"]) == pytest.approx(m["accuracy"])
        assert float(r["flops_true"]) == pytest.approx(m["flops_true"])
        assert r["task"] == "easy_vqa test n=3 seed=0" and r["model"] == "easyvqa-llava"
    assert {r["config"]: r["method"] for r in rows if r["config"] != "vanilla"} == {
        "ref_pio_11": "pio",  # as in the plot: the prefix every method shares is dropped
        "ref_fastv_11": "fastv",
        "ref_dart_33": "dart",
    }
    assert [r["method"] for r in rows if r["config"] == "vanilla"] == ["vanilla", "vanilla"]
    # best accuracy first, ties broken by fewer FLOPs
    keys = [(-float(r["accuracy"]), float(r["flops_true"])) for r in rows]
    assert keys == sorted(keys) and [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n| ") == 1 + 5 and "| easyvqa-llava (b) |" in md and "Notes:" not in md
    for name in ("accuracy_cost.png", "accuracy_cost.svg"):
        assert (out / name).stat().st_size > 10_000
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["command"] == "compare" and len(result["rows"]) == 5


def test_retention_ranks_by_each_runs_own_vanilla(runs, tmp_path):
    out = tmp_path / "ret"
    assert cmd_compare([str(runs / "a"), str(runs / "b"), "--out", str(out), "--metric", "retention"]) == 0
    result = json.loads((out / "results.json").read_text())
    for row in result["rows"]:
        base = next(m for m in _metrics(Path(row["folder"])) if m["name"] == "vanilla")
        assert row["retention"] == pytest.approx(row["accuracy"] / base["accuracy"])
    values = [r["retention"] for r in result["rows"]]
    assert values == sorted(values, reverse=True)


def test_mixed_tasks_are_allowed_and_labelled(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs / "b", other)
    data = json.loads((other / "results.json").read_text())
    data["task"]["split"] = "train"
    (other / "results.json").write_text(json.dumps(data))
    assert cmd_compare([str(runs / "a"), str(other), "--out", str(tmp_path / "mixed")]) == 0
    assert "note: the runs evaluate different tasks" in capsys.readouterr().out
    md = (tmp_path / "mixed" / "leaderboard.md").read_text()
    assert "different tasks (easy_vqa test n=3 seed=0; easy_vqa train n=3 seed=0)" in md
    assert "| easy_vqa train n=3 seed=0 |" in md


def test_bad_run_dirs_are_clear_errors(runs, tmp_path):
    with pytest.raises(TokenReduceError, match="RUN_DIR '.*nowhere' does not exist"):
        cmd_compare([str(tmp_path / "nowhere")])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TokenReduceError, match="is not a directory"):
        cmd_compare([str(tmp_path / "file.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenReduceError, match="has no results.json"):
        cmd_compare([str(tmp_path / "empty")])
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({"meta": {"command": "bench"}, "configs": []}))
    with pytest.raises(
        TokenReduceError, match="written by 'tokenreduce bench'; compare reads the results of 'tokenreduce eval'"
    ):
        cmd_compare([str(runs / "a"), str(bench)])
    (bench / "results.json").write_text("{not json")
    with pytest.raises(TokenReduceError, match="not valid JSON"):
        cmd_compare([str(bench)])
    with pytest.raises(TokenReduceError, match="is given twice"):
        cmd_compare([str(runs / "a"), str(runs / "a" / ".")])


def test_help_and_bad_arguments_are_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        cmd_compare(["-h"])
    assert exc.value.code == 0 and "RUN_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cmd_compare(["x", "--metric", "f1"])
    assert exc.value.code == 2 and "invalid choice: 'f1'" in capsys.readouterr().err


def test_the_tokenreduce_command_runs_compare_and_reports_errors_on_one_line(runs, tmp_path, capsys):
    assert main(["compare", str(runs / "a"), "--out", str(tmp_path / "via_main")]) == 0
    assert (tmp_path / "via_main" / "leaderboard.csv").is_file()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("tokenreduce compare: error: RUN_DIR '")
