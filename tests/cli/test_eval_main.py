"""The main job: ``tokenreduce eval`` with no plan evaluates the shipped reference model on the
suite (vanilla, then every method at three budgets).  Here on a handful of questions."""

from __future__ import annotations

import json

import yaml

from tokenreduce.cli import main
from tokenreduce.core.presets import conf_dir

FEW = ["task.n=3", "eval.batch_size=3", "eval.max_new_tokens=2", "eval.progress=false"]


def _suite_plans() -> list[str]:
    return yaml.safe_load((conf_dir() / "suite" / "reference.yaml").read_text())["plans"]


def test_eval_without_a_plan_runs_the_suite_on_the_reference_model(tmp_path, capsys):
    out = tmp_path / "main"
    assert main(["eval", *FEW, f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "easyvqa-llava" in printed and "suite 'reference'" in printed
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["metrics"]]
    # the suite's Qwen rows (received attention: the Qwen tower has no CLS token) do not apply to
    # LLaVA: skipped, each with a note naming the row and the adapter's reason
    qwen_rows = [p for p in _suite_plans() if p.startswith("qwen_")]
    assert names == ["vanilla", *(p for p in _suite_plans() if p not in qwen_rows)]
    assert results["task"]["suite"] == "reference" and results["task"]["n"] == 3
    # one note per reason, naming every plan skipped for it; nothing else skipped, every FLOP count available
    assert len(qwen_rows) == 12 and len(results["notes"]) == 1
    assert results["notes"][0].startswith(f"skipped {', '.join(qwen_rows)} (suite.skip_inapplicable): needs [")
    for m in results["metrics"]:
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["first_token_agreement"] <= 1.0
        assert m["flops_true"] > 0 and m["flops_paper"] > 0 and m["seconds"] > 0
        target = {"vanilla": 144.0, "33": 48.0, "22": 32.0, "11": 16.0}[m["name"].rsplit("_", 1)[-1]]
        assert m["layer_average"] == target
    assert results["metrics"][0]["retention"] == 1.0
    md = (out / "results.md").read_text()
    assert md.count("\n| ref_") == len(_suite_plans()) - len(qwen_rows) and "| vanilla |" in md
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["choices"]["model"] == "easyvqa_llava" and config["choices"]["suite"] == "reference"
    # the accuracy-vs-cost figure is written by default; per-sample logs only on request
    assert (out / "accuracy_cost.png").stat().st_size > 10_000 and (out / "accuracy_cost.svg").stat().st_size > 10_000
    assert "accuracy_cost.png" in printed and not (out / "samples").exists()


def test_eval_with_a_plan_or_plans_does_not_run_the_suite(tmp_path, capsys):
    assert main(["eval", *FEW, "plan=ref_pio_11", f"out_dir={tmp_path / 'a'}"]) == 0
    assert [m["name"] for m in json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]] == [
        "vanilla",
        "ref_pio_11",
    ]
    assert main(["eval", *FEW, "plans=[ref_fastv_22,ref_dart_11]", f"out_dir={tmp_path / 'b'}"]) == 0
    names = [m["name"] for m in json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]]
    assert names == ["vanilla", "ref_fastv_22", "ref_dart_11"]


def test_a_suite_skips_plans_the_model_cannot_run_with_a_note(tmp_path, capsys):
    out = tmp_path / "qwen"
    argv = [
        "eval",
        "model=tiny_qwen2_5_vl",
        "model.text_layers=4",
        *FEW,
        "suite.plans=[ref_visionzip_33,ref_uniform_33]",
        f"out_dir={out}",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["metrics"]] == ["vanilla", "ref_uniform_33"]
    assert any(n.startswith("skipped ref_visionzip_33") and "CLS" in n for n in results["notes"])
    assert "note: skipped ref_visionzip_33" in capsys.readouterr().out
    # without skipping, the same suite is an error naming the plan's problem
    assert main([*argv[:-1], "suite.skip_inapplicable=false", f"out_dir={tmp_path / 'x'}"]) == 1
    assert "CLS" in capsys.readouterr().err


def test_a_bad_suite_entry_names_its_field(tmp_path, capsys):
    assert main(["eval", *FEW, "suite.plans=[ref_pio_11,nope]", f"out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "suite.plans.1='nope'" in err and "known presets" in err
