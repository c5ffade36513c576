"""``-h`` / ``--help`` of every command (issue 17, item 1): generated from the config's pydantic
sections and config groups, plain text, defaults after the overrides given; "did you mean" for
commands; the top-level help lists every command."""

from __future__ import annotations

import importlib.util

import pytest
from pydantic import BaseModel

from tokenreduce.cli import COMMANDS, main
from tokenreduce.cli.config import CLIConfig, DemoSettings, FlopsSettings, RunSettings, SuiteSettings
from tokenreduce.cli.help import _SECTIONS
from tokenreduce.core.conf import preset_names
from tokenreduce.core.plan import Plan, Stage

OVERRIDE_COMMANDS = ("demo", "run", "eval", "bench", "flops", "viz")


def _help(argv, capsys) -> str:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out
    return out


def test_top_level_help_is_plain_text_listing_every_command(capsys):
    out = _help(["--help"], capsys)
    assert out == _help(["-h"], capsys)
    assert out.startswith("usage: tokenreduce <command> [overrides]")
    listed = [line.split()[0] for line in out.split("commands:")[1].split("\n\n")[0].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    assert "compare" in COMMANDS and "--help" in out and "plan=path/to/my_plan.yaml" in out
    assert "``" not in out and "::" not in out  # no reStructuredText


def test_no_command_prints_the_help_to_stderr_with_status_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: tokenreduce")


@pytest.mark.parametrize("command", OVERRIDE_COMMANDS)
def test_every_override_command_lists_its_groups_and_keys(command, capsys):
    """Each key of each section the command reads is listed with a default and a description,
    straight from the pydantic models (a new field shows up here without another edit)."""
    out = _help([command, "--help"], capsys)
    assert out == _help([command, "-h"], capsys)
    assert out.startswith(f"usage: tokenreduce {command} [overrides] [-h]")
    assert "LexerNoViableAltException" not in out and "invalid override" not in out
    lines = out.splitlines()
    for section in _SECTIONS[command]:
        if section == "plan":
            keys = [f"plan.{k}" for k in Plan.model_fields] + [f"plan.stages.0.{k}" for k in Stage.model_fields]
        else:
            model = CLIConfig.model_fields[section].annotation
            is_model = isinstance(model, type) and issubclass(model, BaseModel)
            keys = [f"{section}.{k}" for k in model.model_fields] if is_model else [section]
        for key in keys:
            row = next((line for line in lines if line.split()[:1] == [key]), None)
            assert row is not None, f"{command} --help lacks {key}"
            assert len(row.split()) >= 3, f"{key}: no default and description in {row!r}"
    for group in ("plan", "model"):
        assert any(line.strip().startswith(f"{group}=") for line in lines)
        assert all(name in out for name in preset_names(group))


def test_help_shows_the_defaults_after_the_overrides_given(capsys):
    out = _help(["eval", "task.n=7", "plan=pio_64", "model=tiny_llava", "--help"], capsys)
    row = next(line for line in out.splitlines() if line.split()[:1] == ["task.n"])
    assert row.split()[1] == "7"
    assert "  plan=pio_64 " in out and "  model=tiny_llava " in out
    assert (
        next(line for line in out.splitlines() if line.split()[:1] == ["plan.stages.1.selector"]).split()[1] == '"nms"'
    )
    # demo's own default model, and a Literal's allowed values after the field's description
    out = _help(["demo", "-h"], capsys)
    assert "  model=tiny_llava " in out
    row = next(line for line in out.splitlines() if "model.attn_implementation" in line)
    assert "attention kernel" in row and "one of: auto, sdpa, eager, flash_attention_2" in row


def test_help_with_overrides_that_do_not_compose_still_helps(capsys):
    out = _help(["run", "plan=nope", "-h"], capsys)
    assert "do not compose" in out and "no plan preset 'nope'" in out and "run.question" in out


def test_sections_of_the_cli_describe_every_key():
    for model in (CLIConfig, DemoSettings, RunSettings, FlopsSettings, SuiteSettings, Plan, Stage):
        missing = [name for name, field in model.model_fields.items() if not field.description]
        assert not missing, f"{model.__name__}: no description for {missing}"


def test_list_plans_and_compare_help(capsys):
    out = _help(["list", "--help"], capsys)
    assert out.startswith("usage: tokenreduce list [out_dir=DIR]") and "out_dir=DIR" in out
    with pytest.raises(SystemExit) as stop:
        main(["plans", "--help"])
    assert stop.value.code == 0 and "--depth" in capsys.readouterr().out
    if importlib.util.find_spec("tokenreduce.cli.compare") is None:
        pytest.skip("tokenreduce.cli.compare is not there yet")
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out


def test_an_unknown_option_is_named(capsys):
    assert main(["eval", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown option '--bogus'" in err and "tokenreduce eval --help" in err


@pytest.mark.parametrize("typo, meant", [("evl", "eval"), ("bnech", "bench"), ("flop", "flops"), ("lists", "list")])
def test_unknown_command_suggests_the_closest(typo, meant, capsys):
    assert main([typo]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown command {typo!r} (did you mean {meant!r}" in err


def test_a_command_without_a_close_match_gets_no_suggestion(capsys):
    assert main(["xyzzy"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "commands: demo, run, eval" in err
