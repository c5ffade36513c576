"""``benchmarks/paper_ranking.py``: ranks with ties, Spearman's rho against hand-computed values,
and the table it prints from a results.json of a reference suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_modules import load_script

pr = load_script("benchmarks/paper_ranking.py")


def test_ranks_put_the_largest_first_and_share_ties():
    assert pr.ranks([0.5, 0.9, 0.5, 0.1]) == [2.5, 1.0, 2.5, 4.0]


def test_spearman_is_one_for_the_same_order_minus_one_for_the_reverse_and_refuses_constant_columns():
    assert pr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swap of neighbours among 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert pr.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="all values equal"):
        pr.spearman([1, 2, 3], [5, 5, 5])


def _results(tmp_path: Path, accuracy: dict[str, float]) -> Path:
    metrics = [{"name": "vanilla", "accuracy": 0.8}]
    for name, acc in accuracy.items():
        metrics.append(
            {"name": name, "accuracy": acc, "accuracy_diff": acc - 0.8, "accuracy_diff_ci": [acc - 0.85, acc - 0.75]}
        )
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"task": {"name": "scenes", "n": 100}, "metrics": metrics}))
    return path


def test_the_table_and_the_rank_correlation_of_a_run_that_reproduces_the_paper_order(tmp_path, capsys):
    # a run whose accuracies follow the paper's order at every budget: rho = 1
    accuracy = {f"scenes_{m}_{b}": 0.8 * pr.PAPER[m][k] / 100 for m in pr.PAPER for k, b in enumerate(pr.BUDGETS)}
    assert pr.main([str(_results(tmp_path, accuracy))]) == 0
    out = capsys.readouterr().out
    assert "| PIO-FVLM w/o VE | 98.8% | 98.8% (-1.0 [-6.0, +4.0])" in out
    assert out.count("Spearman rho +1.00 over 9 methods") == 3
    # the reverse order at one budget: rho = -1 there
    accuracy.update({f"scenes_{m}_11": 0.8 * (200 - pr.PAPER[m][2]) / 100 for m in pr.PAPER})
    assert pr.main([str(_results(tmp_path, accuracy))]) == 0
    assert "budget 11: Spearman rho -1.00" in capsys.readouterr().out


def test_a_run_without_the_suite_rows_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        pr.main([str(_results(tmp_path, {"scenes_pio_33": 0.7}))])
