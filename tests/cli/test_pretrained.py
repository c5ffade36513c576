"""Real checkpoints: loading from a local folder or a Hugging Face Hub id, chat templates, dtype and
attention choice, and the errors for offline hubs and unsupported architectures.

No weights can be downloaded here, so every checkpoint is a tiny model saved with
``save_pretrained``: into a plain folder (``model.path=DIR``), and into a Hugging Face cache laid
out exactly as ``huggingface_hub`` lays it out (``models--org--name/refs/main`` ->
``snapshots/<commit>/``), which the hub-id code path then resolves offline
(``HF_HUB_OFFLINE=1``), as it would after a first download.  The hub tests run the ``tokenreduce``
command in a subprocess because ``huggingface_hub`` reads its environment at import time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenreduce import UnsupportedModelError
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.core.registry import get_registry
from tokenreduce.models import ModelSettings, chat_prompt_template, load_model, load_pretrained, resolve_dtype
from tokenreduce.testing.tiny import save_tiny_checkpoint as save_tiny

CONFS = {"llava": "llava_1_5_7b", "llava_next": "llava_next_7b", "qwen2_5_vl": "qwen2_5_vl_7b"}
REPOS = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, arch: str) -> Path:
    """A Hugging Face cache under ``root`` holding ``repo`` at a fake commit (``refs/main``)."""
    org, name = repo.split("/")
    entry = root / f"models--{org}--{name}"
    save_tiny(entry / "snapshots" / COMMIT, arch)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return root


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    code = "import sys; from tokenreduce.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=full_env, timeout=300
    )


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl"])
def test_load_pretrained_from_a_local_folder_picks_arch_dtype_attention_and_chat_template(tmp_path, arch):
    save_tiny(tmp_path, arch)
    loaded = load_pretrained(tmp_path)
    assert loaded.arch == arch and loaded.kind == "pretrained"
    info = loaded.describe()
    assert (info["dtype"], info["attn_implementation"], info["device"]) == ("float32", "sdpa", "cpu")  # a CPU
    template = loaded.prompt_template()
    image = "<|vision_start|><|image_pad|><|vision_end|>" if arch == "qwen2_5_vl" else "<image>"
    assert image in template and "{question}\nAnswer the question using a single word or phrase." in template
    assert template.endswith("ASSISTANT:" if arch != "qwen2_5_vl" else "<|im_start|>assistant\n")
    # the rendered prompt drives the model, with a plan, inside generate()
    import tokenreduce
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.testing.tiny import make_image

    prompt = format_prompt(template, "what color is the shape?")
    inputs = loaded.processor_inputs([prompt, prompt], [make_image(0), make_image(1, (112, 56))])
    with torch.no_grad(), tokenreduce.apply(loaded.model, "random_50") as att:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2
    assert all(
        v == (n + 1) // 2 or v == n // 2 for v, n in zip(att.trace.stages[0].visual_after, att.trace.original_visual)
    )


def test_chat_template_prompt_without_a_template_is_a_clear_error(tmp_path):
    save_tiny(tmp_path, "llava", chat_template=False)
    loaded = load_pretrained(tmp_path)
    with pytest.raises(TokenReduceError, match="needs a processor with a chat template.*set prompt"):
        loaded.prompt_template()
    assert load_pretrained(tmp_path, prompt="USER: <image> {question} ASSISTANT:").prompt_template() == (
        "USER: <image> {question} ASSISTANT:"
    )
    with pytest.raises(TokenReduceError, match="this one has none"):
        chat_prompt_template(None)


def test_an_architecture_without_adapter_lists_the_supported_model_types(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        UnsupportedModelError,
        match=r"model_type 'llama' has no tokenreduce adapter; "
        + re.escape(f"supported model types: {', '.join(get_registry().model_types())}"),
    ):
        load_pretrained(tmp_path)


def test_dtype_auto_is_float32_on_cpu_and_the_checkpoint_half_precision_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32
    assert resolve_dtype("auto", cuda, torch.float16) == torch.float16  # llava-hf checkpoints
    assert resolve_dtype("auto", cuda, "bfloat16") == torch.bfloat16  # Qwen2.5-VL, as config.json writes it
    assert resolve_dtype("auto", cuda, torch.float32) == torch.bfloat16  # a float32 checkpoint: bf16 on a GPU
    assert resolve_dtype("auto", cuda, None) == torch.bfloat16
    assert resolve_dtype("float16", cuda, torch.bfloat16) == torch.float16  # an explicit choice wins


def test_model_settings_validation():
    with pytest.raises(ValueError, match="needs path .* or repo"):
        ModelSettings(kind="pretrained", arch="llava")
    with pytest.raises(ValueError, match="kind 'tiny' is built in code"):
        ModelSettings(kind="tiny", arch="llava", repo="org/name")
    with pytest.raises(ValueError, match=r"prompt must contain \{question\} or be 'chat_template'"):
        ModelSettings(kind="pretrained", arch="llava", repo="org/name", prompt="USER: <image> ASSISTANT:")
    with pytest.raises(TokenReduceError, match="neither a local folder nor a Hugging Face Hub id"):
        load_pretrained("a/b/c")


def test_path_wins_over_repo_so_a_hub_conf_can_point_at_a_local_copy(tmp_path):
    save_tiny(tmp_path, "llava")
    loaded = load_model(
        {
            "kind": "pretrained",
            "arch": "llava",
            "repo": "llava-hf/llava-1.5-7b-hf",
            "path": str(tmp_path),
            "prompt": "chat_template",
        }
    )
    assert loaded.n_layers == 3 and "<image>" in loaded.prompt_template()
    with pytest.raises(TokenReduceError, match="model_type 'llava' does not match model.arch='qwen2_5_vl'"):
        load_model({"kind": "pretrained", "arch": "qwen2_5_vl", "path": str(tmp_path)})


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl"])
def test_cli_run_with_a_real_model_conf_and_a_local_copy(tmp_path, arch):
    folder = save_tiny(tmp_path / "ckpt", arch)
    out = tmp_path / "out"
    proc = run_cli(
        [
            "run",
            f"model={CONFS[arch]}",
            f"model.path={folder}",
            "plan=random_50",
            "run.max_new_tokens=2",
            f"out_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["weights"] == "pretrained" and results["model"]["dtype"] == "float32"
    assert "Answer the question using a single word or phrase." in results["prompt"]


def test_cli_run_resolves_a_hub_id_through_the_cache_offline(tmp_path):
    cache = hub_cache(tmp_path / "hub", REPOS["llava"], "llava")
    out = tmp_path / "out"
    proc = run_cli(
        ["run", "model=llava_1_5_7b", "plan=random_50", "run.max_new_tokens=2", f"out_dir={out}"],
        tmp_path,
        HF_HUB_CACHE=str(cache),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["decoder_layers"] == 3  # the tiny checkpoint in the cache, not the 32-layer config
    assert results["prompt"].startswith("USER: <image>\nwhat color is the shape?")


def test_cli_offline_without_the_checkpoint_says_the_hub_is_unreachable_and_how_to_use_a_folder(tmp_path):
    proc = run_cli(["run", "model=qwen2_5_vl_7b", "plan=random_50"], tmp_path, HF_HUB_CACHE=str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert "'Qwen/Qwen2.5-VL-7B-Instruct'" in proc.stderr and "Hugging Face Hub is unreachable" in proc.stderr
    assert "model.path=DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_on_a_real_conf_with_random_weights_needs_no_download(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(
        [
            "bench",
            "model=llava_1_5_7b",
            "model.kind=config",
            "model.text_layers=1",
            "model.hf_config.text_config.hidden_size=64",
            "model.hf_config.text_config.intermediate_size=128",
            "model.hf_config.text_config.num_attention_heads=2",
            "model.hf_config.text_config.num_key_value_heads=2",
            "model.hf_config.vision_config.num_hidden_layers=1",
            "model.hf_config.vision_config.hidden_size=32",
            "model.hf_config.vision_config.intermediate_size=64",
            "model.hf_config.vision_config.num_attention_heads=2",
            "plans=[]",
            "bench.repeats=1",
            "bench.warmup=0",
            "bench.max_new_tokens=2",
            "bench.progress=false",
            f"out_dir={out}",
        ],
        tmp_path,
        HF_HUB_CACHE=str(tmp_path / "empty"),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["weights"] == "random" and results["model"]["decoder_layers"] == 1
