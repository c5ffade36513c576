"""Every subcommand on a tiny model in a temporary folder: exit code, printed table, and the
resolved config plus valid JSON results in the output folder."""

import json

import pytest
import yaml
from PIL import Image

from tokenreduce.cli import main

TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56"]
PIO_32 = "pio/nms@1:32+pio/nms@10:54+pio/nms@15:22"  # pio_64 with plan.stages.0.keep=32


def _outputs(folder):
    config = yaml.safe_load((folder / "config.yaml").read_text())
    results = json.loads((folder / "results.json").read_text())  # strict JSON: NaN would fail here
    return config, results


def test_run_writes_answer_trace_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["run", "plan=demo", "plan.stages.0.keep.ratio=0.25", *TINY, "run.max_new_tokens=3", f"out_dir={out}"])
        == 0
    )
    printed = capsys.readouterr().out
    name = "uniform@1:25%+norm@3:25%orig"  # demo changed by the override: named by what it now does
    assert f"with plan {name}: " in printed and "vanilla" in printed and "layer average" in printed
    config, results = _outputs(out)
    assert config["plan"]["stages"][0]["keep"] == {"ratio": 0.25}  # the override is in the resolved config
    assert config["choices"]["plan"] == "demo" and config["model"]["text_layers"] == 4
    assert results["trace"]["visual_per_layer"] == [[16, 4, 4, 4]]
    assert set(results["answers"]) == {"vanilla", name} and len(results["answers"][name]["tokens"]) <= 3
    assert results["accounting"]["per_layer_visual"] == [16, 4, 4, 4]


def test_eval_vanilla_then_plans(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "plans=[demo,uniform_25]",
        *TINY,
        "task.n=4",
        "eval.batch_size=3",
        "eval.max_new_tokens=2",
        "eval.progress=false",
        f"out_dir={out}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1st-tok KL" in printed and "uniform_25" in printed
    config, results = _outputs(out)
    assert config["task"]["n"] == 4 and list(config["resolved_plans"]) == ["demo", "uniform_25"]
    metrics = {m["name"]: m for m in results["metrics"]}
    assert list(metrics) == ["vanilla", "demo", "uniform_25"]
    assert metrics["vanilla"]["first_token_agreement"] == 1.0 and metrics["vanilla"]["first_token_kl"] == 0.0
    assert metrics["demo"]["layer_average"] == 9.0 and metrics["uniform_25"]["layer_average"] == 4.0
    assert metrics["uniform_25"]["flops_true"] < metrics["demo"]["flops_true"] < metrics["vanilla"]["flops_true"]
    assert len(results["examples"]) == 4 and set(results["examples"][0]["answers"]) == set(metrics)
    assert (out / "results.md").read_text().startswith("# Evaluation: easy_vqa")


def test_bench_reports_speedups_beside_the_flop_limit(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "plans=[uniform_25]",
        *TINY,
        "bench.warmup=0",
        "bench.repeats=1",
        "bench.max_new_tokens=2",
        "bench.progress=false",
        "bench.threads=1",
        f"out_dir={out}",
    ]
    assert main(argv) == 0
    assert "FLOP limit x" in capsys.readouterr().out
    _, results = _outputs(out)
    vanilla, plan = results["configs"]
    assert vanilla["name"] == "vanilla" and plan["name"] == "uniform_25"
    assert plan["flop_ratio_limit"] > 1 and set(plan["speedup"]) == {"prefill", "ttft", "decode", "e2e"}
    assert results["environment"]["device"] == "cpu"


def test_flops_of_a_real_config_needs_no_weights(tmp_path, capsys):
    out = tmp_path / "flops"
    assert (
        main(
            [
                "flops",
                "model=llava_1_5_7b",
                "plans=[fastv_64,plan]",
                "plan=pio_64",
                "plan.stages.0.keep=32",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "2.986T" in printed  # the paper's 2.98 T for LLaVA-1.5-7B's 576 visual tokens
    _, results = _outputs(out)
    assert list(results["accounting"]) == ["vanilla", "fastv_64", PIO_32]  # pio_64 changed: named by its stages
    assert results["accounting"][PIO_32]["per_layer_visual"][1] == 32
    assert results["ratios"]["fastv_64"]["flops_paper"] > 1


def test_viz_writes_a_png_of_the_expected_size(tmp_path, capsys):
    out = tmp_path / "viz"
    picture = tmp_path / "in.png"
    Image.new("RGB", (70, 50), (200, 30, 30)).save(picture)
    argv = [
        "viz",
        "plans=[demo,random_50]",
        *TINY,
        f"viz.images=[{picture}]",
        "viz.panel_size=80",
        "viz.header=30",
        f"out_dir={out}",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    with Image.open(out / "kept_tokens.png") as im:
        assert im.size == (3 * 80, 30 + 80)
    _, results = _outputs(out)
    assert set(results["plans"]) == {"demo", "random_50"} and results["figure_size"] == [240, 110]


def test_list_shows_components_and_presets(tmp_path, capsys):
    assert main(["list", f"out_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "plan presets" in printed and "model presets" in printed and "task presets" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert "easy_vqa" in [p["name"] for p in results["presets"]["task"]]
    assert {"tiny_llava", "tiny_llava_next", "tiny_qwen2_5_vl"} <= {p["name"] for p in results["presets"]["model"]}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bench", "bench.repeat=2"], ["bench.repeat", "+bench.repeat"]),  # Hydra: key not in the config
        (["bench", "+bench.repeat=2"], ["bench.repeat", "allowed keys", "repeats"]),  # added, then refused by pydantic
        (["eval", "eval.batch_size=0"], ["eval.batch_size", "greater than or equal to 1"]),
        (["run", "model.dtype=float64"], ["model.dtype"]),
        (["bench", "plans=[pio_64,nope]"], ["plans.1", "'nope'", "known presets"]),
        (["run", "plan=nope"], ["plan/nope"]),
        (["run", "+plan.stages.0.kep=3"], ["stages.0.kep", "allowed keys"]),
        (["flops", "model=tiny_llava", "plans=[pio_64]"], ["stages.1.layer=10", "out of range"]),
        (["list", "plan=demo"], ["out_dir"]),
    ],
)
def test_errors_name_the_key(argv, expected, tmp_path, capsys):
    assert main([*argv, f"out_dir={tmp_path}"] if argv[0] != "list" else argv) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)


def test_demo_runs_any_model_conf_with_a_processor(capsys):
    """The demo loads its model through the model conf (tiny LLaVA by default), so another
    architecture's tiny conf works too, with the image placeholder of that architecture."""
    argv = ["demo", "model=tiny_qwen2_5_vl", "model.text_layers=4", "demo.repeats=1", "demo.max_new_tokens=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "<|image_pad|>" in out and "with plan demo" in out and "random weights" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert len(rows) == 4 and int(rows[0][1]) > int(rows[-1][1])
    assert main(["demo", "model=llava_1_5_7b", "model.kind=config", "model.text_layers=2"]) == 1
    assert "demo needs a model with a processor" in capsys.readouterr().err


def test_prompt_templates_come_from_the_spec_unless_overridden(tmp_path):
    """Without ``model.prompt`` the template is ``prompts.<model_type>`` when the config has one,
    else the architecture's ``default_prompt()``."""
    from tokenreduce.cli.config import setup

    default = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
    ctx = setup("run", [*TINY, f"out_dir={tmp_path}"])
    loaded = ctx.load()
    assert ctx.template(loaded) == default
    ctx = setup("run", [*TINY, "+prompts.llava='Q: <image> {question} A:'", f"out_dir={tmp_path}"])
    assert ctx.template(loaded) == "Q: <image> {question} A:"


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tokenreduce.cli", "plans", "--depth", "4", "--visual", "16", "keep_all"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "keep_all" in done.stdout and "16.000" in done.stdout
