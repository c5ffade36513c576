"""``docs/adapters.md`` holds the current architecture x method table (generated from the registry)."""

from pathlib import Path

from tokenreduce.core.plan import load_preset
from tokenreduce.core.support import MARKERS, method_of, replace_between_markers, support_matrix

PAGE = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def test_method_names_follow_the_deciding_component():
    assert method_of(load_preset("pio_64")) == "pio"  # scorer pio + selector nms
    assert method_of(load_preset("fastv_64")) == "fastv"  # scorer fastv + topk
    assert method_of(load_preset("divprune_64")) == "divprune"
    assert method_of(load_preset("demo")) == "uniform+norm"


def test_docs_adapters_page_holds_the_current_support_matrix():
    matrix = support_matrix()
    page = PAGE.read_text()
    assert page == replace_between_markers(page, matrix.markdown()), (
        "docs/adapters.md is stale: run python -m tokenreduce.core.support --write docs/adapters.md"
    )
    # every registered architecture is a column and a refused cell carries the adapter's reason
    assert all(f"`{a}`" in page.split(MARKERS[0])[1] for a in matrix.architectures)
    refused = [c for c in matrix.cells.values() if not c.runs]
    assert all(c.reason for c in refused)
    assert matrix.cells["llava", "pio"].runs
