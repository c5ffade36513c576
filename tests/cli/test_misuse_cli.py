"""Every ``tokenreduce`` command used carelessly (issue 16): bad values, unknown keys and names,
bad paths, broken checkpoint folders, unusable output folders.

Each case must stop with a non-zero exit status and a one-line error on stderr that names the
field (``tokenreduce <command>: error: <field>...``, or argparse's usage error for ``plans``),
never a traceback.  Every case fails fast: before any weight is loaded, or (broken checkpoint
folders) while reading the folder.  ``load_pretrained`` is checked on the same broken folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenreduce.cli import main
from tokenreduce.core.errors import TokenReduceError, UnsupportedModelError
from tokenreduce.models import load_pretrained
from tokenreduce.testing.tiny import save_tiny_checkpoint

TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56", "plan=random_50"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """A missing file, a file that is no image, a regular file (not a folder)."""
    root = tmp_path_factory.mktemp("misuse")
    (root / "not_an_image.png").write_text("garbage")
    (root / "a_file").write_text("x")
    return {
        "missing": str(root / "missing.png"),
        "bad_png": str(root / "not_an_image.png"),
        "file": str(root / "a_file"),
    }


def _error_line(err: str, command: str) -> str:
    """The one error line of a failed command (stderr has nothing else)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tokenreduce {command}: error: "), err
    return lines[0]


def _fails(argv: list[str], capsys) -> str:
    """Run ``argv`` in-process; it must fail with a one-line error; returns that line."""
    assert main(argv) != 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return _error_line(err, argv[0])


# -- the family: every command with bad values ----------------------------------------------------
CASES = [
    # run
    (["run", "foo=1"], ["'foo=1'", "+foo=1"]),
    (["run", "run.max_new_tokens=-1"], ["run.max_new_tokens", "greater than or equal to 1"]),
    (["run", "run.max_new_tokens=abc"], ["run.max_new_tokens", "valid integer"]),
    (["run", "model=nope"], ["model=nope", "known model presets", "tiny_llava"]),
    (["run", "plan=nope"], ["plan=nope", "known plan presets", "pio_64"]),
    (["run", *TINY, "run.image={missing}"], ["run.image=", "no such file"]),
    (["run", *TINY, "run.image={bad_png}"], ["run.image=", "not an image"]),
    (["run", *TINY, "run.image_size=[-5,10]"], ["run.image_size.0", "greater than or equal to 1"]),
    (["run", *TINY, "model.device=xyz"], ["model.device='xyz'", "auto, cpu, cuda"]),
    (["run", *TINY, "model.dtype=float64"], ["model.dtype", "float32"]),
    (["run", *TINY, "model.arch=gpt2"], ["model.arch", "registered architectures"]),
    (["run", "plan.stages.0.keep=-3"], ["stages.0.keep", "greater than or equal to 1"]),
    (["run", "model=easyvqa_llava", "model.path={missing}"], ["model.path=", "no such folder"]),
    (["run", "model=easyvqa_llava", "model.path={file}"], ["model.path=", "is a file"]),
    (["run", "task.question_format={{x}}"], ["'task.question_format={{x}}'", "quote"]),
    (["run", "plans=[demo]"], ["plans=", "plan=<preset>"]),
    # eval
    (["eval", "task.n=-1"], ["task.n", "greater than or equal to 1"]),
    (["eval", "task=nope"], ["task=nope", "known task presets", "easy_vqa"]),
    (["eval", "suite=nope"], ["suite=nope", "known suite presets"]),
    (["eval", "eval.batch_size=0"], ["eval.batch_size", "greater than or equal to 1"]),
    (["eval", "task.split=nope"], ["task.split", "'train' or 'test'"]),
    (["eval", "plans=[demo,nope]"], ["plans.1='nope'", "unknown plan preset"]),
    (["eval", "+eval.batchsize=2"], ["eval.batchsize", "allowed keys", "batch_size"]),
    # bench
    (["bench", "bench.repeats=-1"], ["bench.repeats", "greater than or equal to 1"]),
    (["bench", "bench.batch_size=0"], ["bench.batch_size"]),
    (["bench", "bench.max_new_tokens=1"], ["bench.max_new_tokens", "greater than or equal to 2"]),
    (["bench", "bench.threads=0"], ["bench.threads"]),
    (["bench", *TINY, "bench.image={missing}"], ["bench.image=", "no such file"]),
    (["bench", "bench.repeat=2"], ["'bench.repeat=2'", "+bench.repeat=2"]),
    # flops
    (["flops", "flops.n_visual=-3"], ["flops.n_visual", "greater than or equal to 1"]),
    (["flops", "flops.kv_dtype_bytes=3"], ["flops.kv_dtype_bytes", "1, 2, 4 or 8"]),
    (["flops", "model.text_layers=0"], ["model.text_layers", "greater than or equal to 1"]),
    (["flops", "model=llava_1_5_7b", "model.hf_config.text_config.hidden_size=-1"], ["model.hf_config", "hidden"]),
    (["flops", "plans=[pio_64,nope]"], ["plans.1='nope'"]),
    # viz
    (["viz", *TINY, "viz.images=[{missing}]"], ["viz.images.0=", "no such file"]),
    (["viz", *TINY, "viz.images=[{bad_png}]"], ["viz.images.0=", "not an image"]),
    (["viz", *TINY, "viz.image_size=[0,5]"], ["viz.image_size=[0, 5]", ">= 1"]),
    (["viz", *TINY, "viz.file=sub/x.png"], ["viz.file='sub/x.png'", "no folder part"]),
    (["viz", *TINY, "viz.file=figure.nope"], ["viz.file='figure.nope'", "image extension"]),
    (["viz", "viz.panel_size=1"], ["viz.panel_size", "greater than or equal to 32"]),
    (["viz", "viz.dim=2"], ["viz.dim", "less than or equal to 1"]),
    # demo
    (["demo", "demo.repeats=0"], ["demo.repeats", "greater than or equal to 1"]),
    (["demo", "demo.max_new_tokens=x"], ["demo.max_new_tokens", "valid integer"]),
    (["demo", "plan=nope"], ["plan=nope", "known plan presets"]),
    (["demo", "model=nope"], ["model=nope", "known model presets"]),
    (["demo", "plans=[demo]"], ["plans=", "plan=<preset>"]),
    # list
    (["list", "foo"], ["'foo'", "out_dir=DIR"]),
    (["list", "out_dir={file}"], ["out_dir=", "is a file, not a folder"]),
    (["list", "out_dir={file}/sub"], ["out_dir=", "cannot be created", "is a file"]),
    # plans
    (["plans", "nope"], ["'nope'", "known presets"]),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_values_give_a_one_line_error_that_names_the_field(argv, expected, paths, tmp_path, capsys):
    argv = [a.format(**paths) for a in argv]
    if argv[0] not in ("list", "plans", "demo") and not any(a.startswith("out_dir=") for a in argv):
        argv.append(f"out_dir={tmp_path / 'out'}")
    line = _fails(argv, capsys)
    for text in expected:
        assert text.format(**paths) in line, (text, line)
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--depth", "0"], "--depth"),
        (["--depth", "-1"], "--depth"),
        (["--visual", "-5"], "--visual"),
        (["--visual", "0"], "--visual"),
        (["--depth", "x"], "--depth"),
    ],
)
def test_plans_refuses_counts_below_one(argv, option, capsys):
    """Issue 16, item 9: ``--depth 0`` raised ZeroDivisionError, ``--visual -5`` printed a table
    of zeros and "-0.0%"; now argparse's usage error names the option and what is allowed."""
    with pytest.raises(SystemExit) as stop:
        main(["plans", *argv])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"tokenreduce plans: error: argument {option}: must be an integer >= 1" in err
    assert main(["plans", "--depth", "4", "--visual", "16", "keep_all"]) == 0  # the ordinary use still works
    assert "16.000" in capsys.readouterr().out


def test_unknown_command_is_one_line(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'nope'; commands: demo, run" in err


# -- item 8: the output folder is checked before any work ----------------------------------------
def _no_work(monkeypatch):
    """Loading a model or building a config fails the test: the command must stop before."""

    def boom(*args, **kwargs):
        raise AssertionError("the command started its work before checking out_dir")

    monkeypatch.setattr("tokenreduce.models.load_model", boom)
    monkeypatch.setattr("tokenreduce.measure.configs.hf_config", boom)


@pytest.mark.parametrize("command", ["run", "eval", "bench", "flops", "viz"])
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_dir_is_checked_before_the_model_runs(command, where, paths, monkeypatch, capsys):
    """Issue 16, item 8: ``out_dir=<a file>`` or a folder that cannot be created ran every
    generation first, then raised FileExistsError / NotADirectoryError."""
    _no_work(monkeypatch)
    value = paths["file"] if where == "file" else paths["file"] + "/sub"
    line = _fails([command, *TINY, "task.n=2", f"out_dir={value}"], capsys)
    assert f"out_dir={value!r}" in line
    assert ("is a file, not a folder" if where == "file" else "cannot be created because") in line


def test_out_dir_that_cannot_be_written_is_refused(tmp_path, monkeypatch, capsys):
    """A folder the process may not write into (a read-only mount; not testable by permissions
    here: the tests may run as root), simulated by a probe that fails like one."""
    import tempfile

    _no_work(monkeypatch)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    line = _fails(["run", *TINY, f"out_dir={tmp_path / 'new' / 'folder'}"], capsys)
    assert "out_dir=" in line and f"cannot write into {tmp_path}" in line and "Read-only file system" in line
    assert not (tmp_path / "new").exists()


def test_a_new_nested_out_dir_is_created_and_written(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "c"
    assert main(["flops", "model=tiny_llava", "plans=[]", f"out_dir={out}"]) == 0
    assert (out / "results.json").is_file() and (out / "config.yaml").is_file()
    capsys.readouterr()


# -- item 7: empty and corrupt checkpoint folders -------------------------------------------------
@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders broken in the ways a download or a copy breaks them."""
    root = tmp_path_factory.mktemp("broken")
    good = save_tiny_checkpoint(root / "good", "llava", text_layers=2)
    folders = {}

    def variant(name: str) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        folders[name] = folder
        return folder

    (root / "empty").mkdir()
    folders["empty"] = root / "empty"
    (variant("corrupt_config") / "config.json").write_text('{"model_type": "llava", ')
    (variant("config_not_an_object") / "config.json").write_text("[1, 2]")
    (variant("no_model_type") / "config.json").write_text('{"hidden_size": 8}')
    (variant("unknown_model_type") / "config.json").write_text('{"model_type": "no_such_arch"}')
    (variant("no_weights") / "model.safetensors").unlink()
    weights = variant("truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for file in variant("no_tokenizer").glob("tokenizer*"):
        file.unlink()
    return folders


#: folder -> what the error says about it
BROKEN = {
    "empty": "has no config.json (it is empty)",
    "corrupt_config": "config.json is not valid JSON",
    "config_not_an_object": "holds a JSON list, not an object",
    "no_model_type": "has no model_type",
    "unknown_model_type": "model_type 'no_such_arch', which transformers does not know",
    "no_weights": "has a config.json but no weights",
    "truncated_weights": "are corrupt or incomplete",
    "no_tokenizer": "could not load the processor",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_cli_broken_checkpoint_folder_is_a_one_line_error(name, broken, tmp_path, capsys):
    """Issue 16, item 7: ``model.path=<empty dir>`` gave ``ValueError: Unrecognized model``, a
    corrupt config.json ``OSError ... not a valid JSON file``: raw tracebacks."""
    folder = broken[name]
    line = _fails(["run", "model=easyvqa_llava", f"model.path={folder}", f"out_dir={tmp_path}"], capsys)
    assert f"model.path='{folder}'" in line and BROKEN[name] in line, line


@pytest.mark.parametrize("name", ["empty", "corrupt_config", "no_model_type"])
def test_flops_reads_the_same_folders_with_the_same_errors(name, broken, tmp_path, capsys):
    folder = broken[name]
    line = _fails(["flops", "model=easyvqa_llava", f"model.path={folder}", f"out_dir={tmp_path}"], capsys)
    assert f"model.path='{folder}'" in line and BROKEN[name] in line, line


@pytest.mark.parametrize("name", list(BROKEN))
def test_load_pretrained_broken_folder_names_the_folder_and_the_argument(name, broken):
    folder = broken[name]
    error = UnsupportedModelError if name == "unknown_model_type" else TokenReduceError
    with pytest.raises(error) as caught:
        load_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and BROKEN[name] in message and str(folder) in message
    assert message.startswith(f"source='{folder}'") and "model.path" not in message


def test_load_pretrained_bad_arguments_name_the_argument(broken, tmp_path):
    with pytest.raises(TokenReduceError, match=r"^source='.*missing': no such folder"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(TokenReduceError, match=r"^dtype='fp8': Input should be 'auto'"):
        load_pretrained(broken["empty"].parent / "good", dtype="fp8")
    with pytest.raises(TokenReduceError, match=r"^device='xyz' is not a device"):
        load_pretrained(broken["empty"].parent / "good", device="xyz")


def test_no_traceback_from_the_installed_command(broken, tmp_path):
    """The real process: the error line and exit status 1 (or argparse's 2), nothing else."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, status in [
        (["run", "model=easyvqa_llava", f"model.path={broken['empty']}", f"out_dir={tmp_path}"], 1),
        (["plans", "--depth", "0"], 2),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "tokenreduce.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )
        assert done.returncode == status, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert done.stderr.strip().splitlines()[-1].startswith(f"tokenreduce {argv[0]}: error: ")
