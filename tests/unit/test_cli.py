"""The tokenreduce command: demo (the README's main job), list, plans, and error handling."""

from tokenreduce.cli import main


def test_demo_prints_per_layer_counts_and_times(capsys):
    assert main(["demo", "model.text_layers=4", "model.image_size=56", "demo.repeats=1", "demo.max_new_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert "with plan demo" in out and "16 visual" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [int(r[1]) for r in rows] == [16, 8, 8, 4]  # demo: 50% before layer 1, 25% of original before 3
    assert "layer average: 9.00" in out and "vanilla" in out and "reduced" in out


def test_demo_with_other_preset_and_override(capsys):
    argv = [
        "demo",
        "plan=random_50",
        "plan.stages.0.keep.ratio=0.25",
        "model.text_layers=4",
        "model.image_size=56",
        "demo.repeats=1",
        "demo.max_new_tokens=2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "with plan random@2:25%" in out  # a preset changed by overrides is named by what it is
    assert [int(line.split()[1]) for line in out.splitlines() if line[:1].isdigit()] == [16, 16, 4, 4]


def test_bad_override_names_the_key(capsys):
    assert main(["demo", "+plan.stages.0.kep=3"]) == 1
    err = capsys.readouterr().err
    assert "stages.0.kep" in err and "allowed keys" in err


def test_list_and_plans(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "builtin:tokenreduce.adapters" in out and "uniform" in out
    assert main(["plans", "--depth", "32", "--visual", "576", "keep_all", "uniform_25"]) == 0
    out = capsys.readouterr().out
    assert "576.000" in out and "144.000" in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
