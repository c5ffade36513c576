"""The lmms-eval bridge (``--model tokenreduce``) used carelessly (issue 16, items 7 and 11).

Broken checkpoint folders given as ``pretrained=`` stop with one line that names the folder and
what is wrong with it; every error of the loader names the bridge's own ``model_args`` keys
(``pretrained``, ``device``, ``prompt``, ...), never the command line's ``model.path``;
``batch_size=-2`` says it must be a positive integer; a plan file or a trace file that cannot be
used stops before the model is loaded.  Runs lmms-eval's own registry and ``create_from_arg_string``
(the fixture of ``test_lmms_eval_plugin.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_lmms_eval_plugin import make_model

import tokenreduce
from tokenreduce.core.errors import TokenReduceError, UnsupportedModelError
from tokenreduce.testing.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmms-misuse")
    good = save_tiny_checkpoint(root / "good", "llava", text_layers=2)
    out = {"good": good}

    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        out[name] = root / name
        return root / name

    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    (variant("corrupt_config") / "config.json").write_text("{not json")
    (variant("no_model_type") / "config.json").write_text("{}")
    (variant("unknown_model_type") / "config.json").write_text('{"model_type": "no_such_arch"}')
    (variant("no_weights") / "model.safetensors").unlink()
    weights = variant("truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    (variant("no_chat_template") / "chat_template.jinja").unlink()
    (root / "a_file").write_text("x")
    out["a_file"] = root / "a_file"
    return out


BROKEN = {
    "empty": "has no config.json (it is empty)",
    "corrupt_config": "config.json is not valid JSON",
    "no_model_type": "has no model_type",
    "unknown_model_type": "model_type 'no_such_arch', which transformers does not know",
    "no_weights": "has a config.json but no weights",
    "truncated_weights": "are corrupt or incomplete",
}


def _message(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    assert "model.path" not in message and "model.device" not in message and "model.prompt" not in message, message
    return message


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_pretrained_folder_is_one_line_naming_pretrained_and_the_folder(lmms_eval, folders, name):
    """Item 7 through the bridge: these were ``ValueError: Unrecognized model``, ``OSError ... not a
    valid JSON file`` or a ``SafetensorError``, and named ``model.path``."""
    folder = folders[name]
    error = UnsupportedModelError if name == "unknown_model_type" else TokenReduceError
    with pytest.raises(error) as caught:
        make_model(lmms_eval, f"pretrained={folder},plan=random_50")
    message = _message(caught)
    assert message.startswith(f"model_args pretrained='{folder}'") and BROKEN[name] in message, message


def test_missing_folder_and_a_file_name_pretrained(lmms_eval, folders):
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['empty'].parent / 'missing'}")
    assert _message(caught).startswith("model_args pretrained=") and "no such folder" in str(caught.value)
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['a_file']}")
    assert _message(caught).startswith("model_args pretrained=") and "is a file" in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_and_prompt_errors_name_the_model_args_keys(lmms_eval, folders):
    """Item 11: the loader's errors named the command line's ``model.device`` / ``model.prompt``."""
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['good']},device=cuda")
    assert "model_args device='cuda' but CUDA is not available; use model_args device=cpu" in _message(caught)
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['good']},device=gpu7")
    assert "model_args device='gpu7' is not a device" in _message(caught)
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['no_chat_template']}")
    assert "needs a processor with a chat template" in _message(caught)
    assert "set model_args prompt to a template" in str(caught.value)


def test_offline_hub_message_says_how_to_point_pretrained_at_a_folder(lmms_eval):
    from tokenreduce.integrations.lmms_eval_plugin import KEYS
    from tokenreduce.measure.configs import _hub_error

    message = _hub_error("org/model", None, OSError("We couldn't connect to 'https://huggingface.co'"), KEYS)
    assert "point at it with --model_args pretrained=DIR" in message and "model.path" not in message


@pytest.mark.parametrize("value", ["-2", "0", "two", -2, 0])
def test_batch_size_must_be_a_positive_integer(lmms_eval, folders, value):
    """Item 11: ``batch_size=-2`` said "'auto' is not supported"."""
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['good']}", batch_size=value)
    message = _message(caught)
    assert "batch_size: must be a positive integer (requests per generate() call)" in message
    assert "auto" not in message and f"(got {value!r})" in message
    with pytest.raises(TokenReduceError, match="must be a positive integer .*batch_size 'auto' is not supported"):
        make_model(lmms_eval, f"pretrained={folders['good']}", batch_size="auto")


def test_plan_errors_name_the_plan_key(lmms_eval, folders, tmp_path):
    with pytest.raises(tokenreduce.PlanError, match=r"^model_args plan='pio_65': unknown plan preset 'pio_65'"):
        make_model(lmms_eval, f"pretrained={folders['good']},plan=pio_65")
    with pytest.raises(tokenreduce.PlanError, match=r"^model_args plan='pio_64': .*out of range"):
        make_model(lmms_eval, f"pretrained={folders['good']},plan=pio_64")  # cuts at layer 10 of 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [layer: 0\n")
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['good']},plan={bad}")
    assert _message(caught).startswith(f"model_args plan='{bad}': the plan file is not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(TokenReduceError, match="the plan file holds a list, not a plan"):
        make_model(lmms_eval, f"pretrained={folders['good']},plan={listed}")


def test_trace_file_is_checked_before_the_model_loads(lmms_eval, folders, tmp_path, monkeypatch):
    """Like out_dir on the command line: a trace file that cannot be written stopped the
    evaluation after its first batch."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the trace file was checked")

    monkeypatch.setattr("tokenreduce.models.load_pretrained", boom)
    under_file = f"{folders['a_file']}/trace.jsonl"
    with pytest.raises(TokenReduceError) as caught:
        make_model(lmms_eval, f"pretrained={folders['good']},trace_file={under_file}")
    assert _message(caught).startswith(f"model_args trace_file='{under_file}': cannot write it")
    with pytest.raises(TokenReduceError, match="is a folder; give a file"):
        make_model(lmms_eval, f"pretrained={folders['good']},trace_file={tmp_path}")
    monkeypatch.undo()
    trace = tmp_path / "trace.jsonl"
    make_model(lmms_eval, f"pretrained={folders['good']},trace_file={trace}")
    assert not trace.exists()  # the check leaves nothing behind
