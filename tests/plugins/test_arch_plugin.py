"""A third-party architecture gets loading, ``flops``, ``bench``, ``viz`` and the lmms-eval bridge
for free.

``toy_arch/toy_llava_plugin.py`` is the plugin: ``toy_llava``, a renamed copy of LLaVA-1.5 (a
config class and a model class registered with transformers' Auto classes, and one ArchSpec
subclass registered with ``registry.architecture``).  It is installed the way pip would install
it: a distribution whose ``tokenreduce`` entry point names the module, found on ``sys.path`` by
``importlib.metadata``.  Nothing in tokenreduce names ``toy_llava``.

The copy has LLaVA-1.5's code, weights and formulas, so every result is compared with LLaVA-1.5's
own: the same tiny weights, the same synthetic inputs and logits, the same FLOPs, the same kept
tokens, the same lmms-eval prompts, answers and log-likelihoods.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import tokenreduce
from tokenreduce.adapters import architecture_folders
from tokenreduce.cli import main
from tokenreduce.core.registry import get_registry, reset_registry

PLUGIN_DIR = Path(__file__).resolve().parent / "toy_arch"
MODULE = "toy_llava_plugin"
DIST = "toy-llava-plugin"
TOY, LLAVA = "toy_llava", "llava"
TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The plugin installed (a ``.dist-info`` with its entry point, the module on ``sys.path``) and
    a fresh registry; ``sys.path``, the module and the registry restored afterwards."""
    site = tmp_path / "site"
    info = site / "toy_llava_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[tokenreduce]\ntoy_llava = {MODULE}\n")
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop(MODULE, None)
    reset_registry()
    yield importlib.import_module(MODULE)
    sys.modules.pop(MODULE, None)
    monkeypatch.undo()
    reset_registry()


def _outputs(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- registration ---------------------------------------------------------------------------------
def test_the_architecture_arrives_through_its_entry_point(toy):
    registry = get_registry()
    spec = registry.spec_for(TOY)
    assert isinstance(spec, toy.ToyLlavaSpec) and spec.adapter is registry.spec_for(LLAVA).adapter
    origins = {(c["kind"], c["name"]): c["origin"] for c in tokenreduce.list_components()}
    assert origins[("architecture", TOY)].startswith(f"{DIST} 0.1.0 (entry point 'toy_llava')")
    assert origins[("adapter", TOY)] == origins[("architecture", TOY)]
    from tokenreduce.testing.tiny import KINDS

    assert TOY in KINDS and LLAVA in KINDS


# -- loading --------------------------------------------------------------------------------------
def test_loading_tiny_config_and_pretrained(toy, tmp_path):
    from tokenreduce.models import load_model, load_pretrained
    from tokenreduce.testing.tiny import save_tiny_checkpoint

    tiny = {"kind": "tiny", "text_layers": 2, "image_size": 28}
    ours, theirs = load_model({**tiny, "arch": TOY}), load_model({**tiny, "arch": LLAVA})
    assert type(ours.model) is toy.ToyLlavaForConditionalGeneration and ours.describe()["model_type"] == TOY
    assert _same_weights(ours.model, theirs.model)

    hf = theirs.model.config.to_dict() | {"model_type": TOY}
    config_kind = load_model({"kind": "config", "arch": TOY, "hf_config": hf, "text_layers": 1})
    reference = load_model(
        {"kind": "config", "arch": LLAVA, "hf_config": theirs.model.config.to_dict(), "text_layers": 1}
    )
    inputs, expected = (m.synthetic_inputs(batch_size=2, n_text=10) for m in (config_kind, reference))
    assert inputs.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in inputs.items())
    with torch.no_grad():
        assert torch.equal(config_kind.model(**inputs).logits, reference.model(**inputs).logits)

    folder = save_tiny_checkpoint(tmp_path / "ckpt", TOY)
    loaded = load_pretrained(folder)
    assert loaded.arch == TOY and type(loaded.model) is toy.ToyLlavaForConditionalGeneration
    assert "<image>" in loaded.prompt_template() and loaded.processor is not None
    prompts = [loaded.prompt_template().replace("{question}", "what color is the shape?")]
    from tokenreduce.testing.tiny import make_image

    batch = loaded.processor_inputs(prompts, [make_image(0)])
    with torch.no_grad(), tokenreduce.apply(loaded.model, "uniform_25") as att:
        loaded.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert att.trace.original_visual == [16] and att.trace.visual_per_layer(0) == [4, 4, 4]  # uniform_25 at layer 0


# -- the commands ---------------------------------------------------------------------------------
def test_flops_command(toy, tmp_path, capsys):
    real = ["model=llava_1_5_7b", "plans=[fastv_64]"]
    assert (
        main(["flops", *real, f"model.arch={TOY}", f"model.hf_config.model_type={TOY}", f"out_dir={tmp_path / 'toy'}"])
        == 0
    )
    assert "2.986T" in capsys.readouterr().out  # the paper's 2.98 T for LLaVA-1.5-7B's 576 visual tokens
    assert main(["flops", *real, f"out_dir={tmp_path / 'llava'}"]) == 0
    ours, theirs = _outputs(tmp_path / "toy"), _outputs(tmp_path / "llava")
    assert ours["ratios"] == theirs["ratios"]
    for name, acc in ours["accounting"].items():
        assert acc["vision_flops_true"] > 0 and acc["projector_flops_true"] > 0
        assert {k: v for k, v in acc.items() if k != "model"} == {
            k: v for k, v in theirs["accounting"][name].items() if k != "model"
        }

    from tokenreduce.measure.flops import count_with_flop_counter
    from tokenreduce.testing.tiny import tiny_config

    counts = {arch: count_with_flop_counter(tiny_config(arch), [26] * 4, n_visual=16) for arch in (TOY, LLAVA)}
    assert counts[TOY] == counts[LLAVA] and counts[TOY]["vision_tower"] > 0


def test_bench_command(toy, tmp_path, capsys):
    argv = [
        "bench",
        "plans=[uniform_25]",
        *TINY,
        "bench.warmup=0",
        "bench.repeats=1",
        "bench.max_new_tokens=2",
        "bench.progress=false",
        "bench.threads=1",
        "bench.synthetic=true",
    ]
    assert main([*argv, f"model.arch={TOY}", f"out_dir={tmp_path}"]) == 0
    results = _outputs(tmp_path)
    assert results["model"]["model_type"] == TOY and results["inputs"]["n_visual"] == [16]
    vanilla, plan = results["configs"]
    assert plan["name"] == "uniform_25" and plan["flop_ratio_limit"] > 1
    assert not [n for n in results["notes"] if "FLOP accounting failed" in n], results["notes"]


def test_viz_command(toy, tmp_path, capsys):
    argv = ["viz", "plans=[uniform_25]", *TINY, "viz.panel_size=64", "viz.header=20"]
    assert main([*argv, f"model.arch={TOY}", f"out_dir={tmp_path / 'toy'}"]) == 0
    assert main([*argv, f"out_dir={tmp_path / 'llava'}"]) == 0
    ours, theirs = _outputs(tmp_path / "toy"), _outputs(tmp_path / "llava")
    assert (tmp_path / "toy" / "kept_tokens.png").read_bytes() == (tmp_path / "llava" / "kept_tokens.png").read_bytes()
    assert ours["plans"] == theirs["plans"] and ours["samples"] == theirs["samples"]
    assert ours["samples"][0]["n_visual"] == 16


# -- the lmms-eval bridge -------------------------------------------------------------------------
def test_lmms_eval_bridge_builds_the_same_prompts_and_answers(toy, lmms_eval, tmp_path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from tokenreduce.testing.tiny import make_image, save_tiny_checkpoint

    docs = {"toy": {"test": [{"image": make_image(i, (56, 56))} for i in range(3)]}}

    def ask(kind: str, arch_args: tuple) -> list:
        out = []
        for i in range(3):
            visual = (lambda doc: [doc["image"], doc["image"]]) if i == 2 else (lambda doc: [doc["image"]])
            args = (f"question {i}?", arch_args, visual, i, "toy", "test")
            out.append(
                Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})
            )
        return out

    results = {}
    for arch in (TOY, LLAVA):
        folder = save_tiny_checkpoint(tmp_path / arch, arch, text_layers=4)
        lm = get_model("tokenreduce").create_from_arg_string(
            f"pretrained={folder},plan=random_50", {"batch_size": 2, "max_batch_size": None, "device": None}
        )
        lm.task_dict = docs
        results[arch] = (
            type(lm.loaded.model).__name__,
            lm._prompt("what?", 2),
            lm.generate_until(ask("generate_until", {"max_new_tokens": 4, "until": []})),
            lm.loglikelihood(ask("loglikelihood", "red circle")),
        )
    assert results[TOY][0] == "ToyLlavaForConditionalGeneration"
    assert "<image> <image>" in results[TOY][1]  # LLaVA's placeholder rule, from the inherited spec
    assert results[TOY][1:] == results[LLAVA][1:]


def test_registry_is_normal_again_after_the_plugin():
    assert TOY not in get_registry().names("architecture")
    assert get_registry().names("architecture") == sorted(set(architecture_folders()) - {"cut"})
