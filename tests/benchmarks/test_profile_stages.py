"""The stage profiler (``benchmarks/profile_stages.py``) in its tiny ``--quick`` mode, so that the
script cannot rot: every configuration prints a timing row and a per-op table, and the stages it
profiles really cut (the engine's trace says so).  Timings are printed, never asserted."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import tokenreduce

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "profile_stages.py"


def _load():
    spec = importlib.util.spec_from_file_location("profile_stages", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


profile_stages = _load()


def test_quick_run_prints_every_table(capsys):
    threads = torch.get_num_threads()
    try:
        profile_stages.main(["--quick", "--threads", "1", "--lengths", "80,70", "--top", "5"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| (pio|fastv) \| ([\d.]+) \| ([\d.]+) \|", out, flags=re.M)
    assert {(int(s), m) for s, _, m, _, _ in rows} == {(80, "pio"), (80, "fastv"), (70, "pio"), (70, "fastv")}
    assert all(float(plain) > 0 and float(stage) > 0 and float(eq) > 0 for _, plain, _, stage, eq in rows)
    for length in (80, 70):
        for method in ("pio", "fastv"):
            assert f"{method} stage at {length} tokens: top 5 ops by self CPU time" in out
            assert f"{method} stage at {length} tokens: matrix products by shape" in out
    assert out.count("| total self CPU") == 4


def test_the_profiled_stages_cut():
    model = profile_stages.build_model(profile_stages.argparse.Namespace(quick=True, layers=3))
    ids, feats = profile_stages.make_inputs(model, 20)
    assert int((ids == model.config.image_token_index).sum()) == 20
    for name, plan in profile_stages.plans(20).items():
        with tokenreduce.apply(model, plan) as att, profile_stages.visual_features(model, ids, feats):
            with torch.no_grad():
                model(input_ids=ids)
        (stage,) = att.trace.stages
        assert stage.visual_before == [20] and 0 < stage.visual_after[0] < 20, name
    # the embedding hook is gone after its block
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "2"], "--layers must be >= 3"),
        (["--lengths", "60"], "--lengths must each exceed 61"),
        (["--methods", "pio,dart"], "unknown ['dart']"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        profile_stages.main(["--quick", *argv])
    assert message in capsys.readouterr().err
