"""Plan files, names of composed plans and early checks (issue 17, items 1-2).

``plan=path/to/my_plan.yaml`` and ``plans=[path/to/my_plan.yaml,...]`` compose a file like a
preset, named after its stem; a preset changed by ``plan.*`` overrides is named and described by
what it now does; unknown presets and strategy names get "did you mean" and stop before the
model loads.  ``flops`` needs no weights, so most checks use it on a tiny config (16 visual
tokens, 4 decoder layers)."""

from __future__ import annotations

import json

import pytest
import yaml

from tokenreduce.cli import main
from tokenreduce.cli.config import Context

TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56"]
FLOPS = ["flops", *TINY, "flops.n_visual=16"]
MY_PLAN = """
positions: renumber
stages:
  - layer: 1
    keep: 6
    scorer: norm
  - layer: 2
    keep: {ratio: 0.5}
    selector: uniform
"""


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plans" / "my_plan.yaml"
    path.parent.mkdir()
    path.write_text(MY_PLAN)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads its model (the checks must come first)."""

    def load(self):
        raise AssertionError("the model was loaded before the plan was checked")

    monkeypatch.setattr(Context, "load", load)


def _results(folder):
    config = yaml.safe_load((folder / "config.yaml").read_text())
    return config, json.loads((folder / "results.json").read_text())


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- plan files ----------------------------------------------------------------------------------
def test_plan_file_path_is_composed_and_named_after_its_stem(plan_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*FLOPS, f"plan={plan_file}", f"out_dir={out}"]) == 0, capsys.readouterr().err
    config, results = _results(out)
    assert config["choices"]["plan"] == "my_plan"
    plan = config["resolved_plans"]["my_plan"]
    assert plan["positions"] == "renumber" and [s["layer"] for s in plan["stages"]] == [1, 2]
    # a file without a description is described by its stages
    assert plan["description"].startswith("before layer 1 keep 6 visual tokens (norm scores, topk selector)")
    assert results["accounting"]["my_plan"]["per_layer_visual"] == [16, 6, 3, 3]


def test_plan_file_with_overrides_and_in_a_plans_list(plan_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(plan_file.parent.parent)
    out = tmp_path / "out"
    argv = [*FLOPS, "plans=[./plans/my_plan.yaml,uniform_25,plan]", "plan=plans/my_plan.yaml"]
    assert main([*argv, "plan.stages.0.keep=8", f"out_dir={out}"]) == 0, capsys.readouterr().err
    _, results = _results(out)
    visual = {name: acc["per_layer_visual"] for name, acc in results["accounting"].items()}
    # the file as it is, a preset, and the file changed by an override (named by what it now does)
    assert visual == {
        "vanilla": [16, 16, 16, 16],
        "my_plan": [16, 6, 3, 3],
        "uniform_25": [4, 4, 4, 4],
        "norm@1:8+uniform@2:50%": [16, 8, 4, 4],
    }


def test_plan_file_wins_over_a_preset_of_the_same_name(tmp_path, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text("stages: [{layer: 0, keep: 2, selector: uniform}]\n")
    out = tmp_path / "out"
    assert main([*FLOPS, f"plan={path}", f"out_dir={out}"]) == 0, capsys.readouterr().err
    _, results = _results(out)
    assert results["accounting"]["demo"]["per_layer_visual"] == [2, 2, 2, 2]


def test_quoted_home_relative_plan_file(plan_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(plan_file.parent))
    out = tmp_path / "out"
    assert main([*FLOPS, "plan='~/my_plan.yaml'", f"out_dir={out}"]) == 0, capsys.readouterr().err
    assert "my_plan" in _results(out)[1]["accounting"]


def test_the_plans_command_reads_plan_files(plan_file, capsys):
    assert main(["plans", "--depth", "4", "--visual", "16", str(plan_file), "keep_all"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(str(plan_file)))
    assert "[6, 3]" in row and "7.000" in row  # (16 + 6 + 3 + 3) / 4


@pytest.mark.parametrize(
    "content, expected",
    [
        ("stages: [{layer: 1, kep: 3}]\n", ["invalid plan (", "stages.0.kep", "allowed keys"]),
        ("stages: [{layer: 1, keep: 3, scorer: nrom}]\n", ["unknown scorer 'nrom'", "did you mean 'norm'"]),
        ("- layer: 1\n  keep: 3\n", ["the file holds list, not a mapping"]),
        ("stages: [{layer: 1, keep: 3\n", ["not valid YAML at line 2"]),
    ],
    ids=["unknown-key", "unknown-scorer", "a-list", "broken-yaml"],
)
def test_a_bad_plan_file_is_one_line_naming_it_before_the_model_loads(content, expected, tmp_path, no_model, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    for argv, where in (
        (["run", *TINY, f"plan={path}"], f"plan={path}"),
        (["bench", *TINY, f"plans=[demo,{path}]"], f"plans.1='{path}'"),
    ):
        err = _error([*argv, f"out_dir={tmp_path / 'out'}"], capsys)
        for text in [where, *expected]:
            assert text in err, (text, err)


@pytest.mark.parametrize("entry", ["missing.yaml", "folder.yaml"])
def test_a_missing_plan_file_is_named(entry, tmp_path, capsys):
    (tmp_path / "folder.yaml").mkdir()
    path = tmp_path / entry
    err = _error([*FLOPS, f"plan={path}", f"out_dir={tmp_path / 'out'}"], capsys)
    assert f"plan={path}" in err and ("no such file" in err or "a folder" in err)
    err = _error([*FLOPS, f"plans=[demo,{path}]", f"out_dir={tmp_path / 'out'}"], capsys)
    assert f"plans.1='{path}'" in err and ("no such file" in err or "a folder" in err)


# -- names of composed plans -----------------------------------------------------------------------
def test_a_changed_preset_is_named_and_described_by_what_it_now_does(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["flops", "model=llava_1_5_7b", "plans=[plan]", "plan=ref_visionzip_11", "plan.stages.0.keep=32"]
    assert main([*argv, f"out_dir={out}"]) == 0, capsys.readouterr().err
    config, _ = _results(out)
    (name, plan), *_ = config["resolved_plans"].items()
    assert name == "vision_cls/visionzip@0:32"
    assert plan["description"] == (
        "before layer 0 keep 32 visual tokens (vision_cls scores, visionzip selector); positions keep "
        "(plan=ref_visionzip_11 changed by plan.stages.0.keep=32)"
    )
    assert "ref_visionzip_11" not in name and "16 of 144" not in plan["description"]


@pytest.mark.parametrize(
    "overrides, name, description",
    [
        (["+plan.name=mine", "plan.stages.0.keep=32"], "mine", "before layer 0 keep 32"),  # the user's own name
        (["plan.description=my words"], "ref_visionzip_11", "my words"),  # only the text changed: the preset's name
        (["plan.positions=renumber"], "vision_cls/visionzip@0:16", "positions renumber (plan=ref_visionzip_11"),
    ],
)
def test_names_of_composed_plans(overrides, name, description, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["flops", "model=llava_1_5_7b", "plan=ref_visionzip_11", *overrides, f"out_dir={out}"]
    assert main(argv) == 0, capsys.readouterr().err
    resolved = _results(out)[0]["resolved_plans"]
    assert list(resolved) == [name] and description in resolved[name]["description"]


# -- did you mean, before the model loads -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "plan=pio_46"], ["invalid override 'plan=pio_46'", "(did you mean 'pio_64'", "known plan presets"]),
        (["run", "model=tiny_lava"], ["no model preset 'tiny_lava' (did you mean 'tiny_llava'"]),
        (
            ["bench", "plans=[demo,unifrom_25]"],
            ["plans.1='unifrom_25': unknown plan preset (did you mean 'uniform_25'"],
        ),
        (["run", *TINY, "plan.stages.1.scorer=nrom"], ["plan=demo*", "unknown scorer 'nrom'", "did you mean 'norm'?"]),
        (["eval", *TINY, "plans=[demo,plan]", "plan.stages.0.selector=unifrom"], ["did you mean 'uniform'?"]),
        (["viz", *TINY, "plans=[plan]", "+plan.stages.0.scorer={name: norm, bogus: 1}"], ["stages.0.scorer.bogus"]),
    ],
)
def test_unknown_names_suggest_the_closest_before_the_model_loads(argv, expected, tmp_path, no_model, capsys):
    err = _error([*argv, f"out_dir={tmp_path / 'out'}"], capsys)
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


def test_plans_command_suggests_a_preset(capsys):
    err = _error(["plans", "pio_46"], capsys)
    assert "unknown plan preset 'pio_46' (did you mean 'pio_64'" in err
