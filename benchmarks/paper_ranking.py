"""Set an eval run of a reference suite beside the paper's LLaVA-1.5-7B table and measure how far
the two rankings agree.

The paper (PIO-FVLM, arXiv 2602.04657, Table 1) reports, for nine methods at 192, 128 and 64 of
576 visual tokens, the mean over eight benchmarks of score / vanilla score ("Avg", in %; also in
docs/pio-fvlm.md).  This script reads a ``results.json`` written by ``tokenreduce eval`` with one
of the reference suites (``suite=scenes``: ``scenes_<method>_<33|22|11>``; ``suite=reference``:
``ref_<method>_...``) and prints, per budget and method, the paper's retention, the run's retention
(accuracy / vanilla accuracy), the run's paired difference to vanilla with its 95% bootstrap
interval, and then, per budget, Spearman's rank correlation between the two retention columns over
the nine methods (ties share their mean rank), with the rank of every method in both.

Usage::

    tokenreduce eval model=scenes_llava out_dir=outputs/eval/scenes
    python benchmarks/paper_ranking.py outputs/eval/scenes/results.json
    python benchmarks/paper_ranking.py outputs/eval/main/results.json --prefix ref_
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: The paper's "Avg" retention (%) on LLaVA-1.5-7B at 192 / 128 / 64 visual tokens (Table 1).
PAPER: dict[str, tuple[float, float, float]] = {
    "fastv": (89.0, 83.2, 74.0),
    "pdrop": (96.2, 94.0, 74.4),
    "sparsevlm": (97.2, 95.6, 90.6),
    "dart": (98.3, 97.0, 92.8),
    "pio": (98.8, 98.1, 94.7),
    "visionzip": (97.8, 96.4, 93.0),
    "holov": (98.7, 97.2, 94.4),
    "scope": (98.3, 97.5, 95.4),
    "pio_ve": (98.9, 98.1, 96.6),
}
LABELS = {
    "fastv": "FastV",
    "pdrop": "PDrop",
    "sparsevlm": "SparseVLM",
    "dart": "DART",
    "pio": "PIO-FVLM w/o VE",
    "visionzip": "VisionZip",
    "holov": "HoloV",
    "scope": "SCOPE",
    "pio_ve": "PIO-FVLM w/ VE",
    "divprune": "DivPrune",
    "uniform": "uniform (control)",
    "random": "random (control)",
}
BUDGETS = ("33", "22", "11")
PAPER_TOKENS = {"33": 192, "22": 128, "11": 64}


def ranks(values: list[float]) -> list[float]:
    """Rank 1 = the largest value; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks)."""
    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    if va == 0 or vb == 0:
        raise ValueError("a column has all values equal: its ranks carry no order")
    return cov / (va * vb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of a `tokenreduce eval` run of a reference suite")
    parser.add_argument("--prefix", default="scenes_", help="preset prefix of the suite (scenes_ or ref_)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    by_name = {m["name"]: m for m in results["metrics"]}
    if "vanilla" not in by_name:
        parser.error(f"{args.results}: no vanilla row (run eval with vanilla, the default)")
    vanilla = by_name["vanilla"]["accuracy"]
    missing = [f"{args.prefix}{m}_{b}" for m in PAPER for b in BUDGETS if f"{args.prefix}{m}_{b}" not in by_name]
    if missing:
        parser.error(f"{args.results}: rows missing for {', '.join(missing)} (is --prefix right?)")
    print(f"vanilla accuracy {vanilla:.4f} on {results['task'].get('n', '?')} questions of {results['task']['name']}")
    print()
    header = "| method | " + " | ".join(
        f"paper {PAPER_TOKENS[b]} | here {b}.{'3' if b == '33' else '2' if b == '22' else '1'}%" for b in BUDGETS
    )
    print(header + " |")
    print("|---" * (1 + 2 * len(BUDGETS)) + "|")
    for method, label in LABELS.items():
        cells = []
        for k, b in enumerate(BUDGETS):
            row = by_name.get(f"{args.prefix}{method}_{b}")
            paper = f"{PAPER[method][k]:.1f}%" if method in PAPER else "-"
            if row is None:
                here = "-"
            else:
                lo, hi = row["accuracy_diff_ci"]
                here = f"{100 * row['accuracy'] / vanilla:.1f}% ({100 * row['accuracy_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"
            cells += [paper, here]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("here: retention (Δ accuracy to vanilla in points [95% paired bootstrap interval])")
    print()
    for k, b in enumerate(BUDGETS):
        methods = list(PAPER)
        paper = [PAPER[m][k] for m in methods]
        here = [by_name[f"{args.prefix}{m}_{b}"]["accuracy"] for m in methods]
        rp, rh = ranks(paper), ranks(here)
        order = sorted(range(len(methods)), key=lambda i: rh[i])
        listing = ", ".join(f"{LABELS[methods[i]]} {rh[i]:g} (paper {rp[i]:g})" for i in order)
        print(
            f"budget {b}: Spearman rho {spearman(paper, here):+.2f} over {len(methods)} methods; ranks here: {listing}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
