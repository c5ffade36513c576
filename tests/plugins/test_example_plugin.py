"""The example plugin in ``examples/tokenreduce-example-plugin``, installed for real.

``pip install --target`` builds the example's wheel (setuptools, no build isolation, no index)
into a temporary folder once per module; each test puts that folder on ``sys.path`` and rebuilds
the registry, so tokenreduce finds the ``tokenreduce`` entry point through
``importlib.metadata`` exactly as it would in a virtual environment.  The fixture restores
``sys.path``, forgets the plugin's modules and resets the registry afterwards.

Checked: the entry point and its origin (``tokenreduce list``); the scorer against a reference
written here (synthetic ragged, left-padded batches and the hidden states captured inside a
tiny LLaVA's ``generate()``); settings validation; the scorer from Hydra overrides and from the
plan preset the package ships, found through its ``tokenreduce.conf`` entry point (in ``plan=``,
in ``plans=[...]`` and in ``tokenreduce list``; ``hydra.searchpath`` keeps working).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tokenreduce
from tokenreduce import PlanError
from tokenreduce.cli import main
from tokenreduce.core.conf import preset_names
from tokenreduce.core.registry import ENTRY_POINT_GROUP, reset_registry
from tokenreduce.core.types import TokenView

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tokenreduce-example-plugin"
DIST = "tokenreduce-example-plugin"
VERSION = "0.1.0"
MODULE = "tokenreduce_example_plugin"
SCORER = "text_relevance"
TINY = ["model=tiny_llava", "model.text_layers=4", "model.image_size=56"]
MIN_SETUPTOOLS = (77, 0)  # the example's [build-system] requires (wheel building and SPDX license built in)


def _build_backend_problem() -> str | None:
    """Why the example cannot be built without build isolation here (None: it can)."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return "setuptools is not importable: pip --no-build-isolation cannot build the example plugin"
    version = importlib.metadata.version("setuptools")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_SETUPTOOLS:
        need = ".".join(map(str, MIN_SETUPTOOLS))
        return f"setuptools {version} is older than {need}, which the example plugin's build-system requires"
    return None


def _installed_elsewhere() -> bool:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """The example plugin pip-installed into a fresh folder (built from a copy of the sources, so
    that the build leaves no ``build/`` or ``*.egg-info`` in the repository)."""
    problem = _build_backend_problem()
    if problem:
        pytest.skip(problem)
    source = tmp_path_factory.mktemp("example-src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("example-site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--quiet",
        "--target",
        str(target),
        str(source),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return target


def _forget_plugin_modules() -> None:
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]


@pytest.fixture
def plugin(site_dir):
    """The installed plugin on ``sys.path`` with a fresh registry; everything restored afterwards."""
    saved_path = list(sys.path)
    _forget_plugin_modules()
    sys.path.insert(0, str(site_dir))
    importlib.invalidate_caches()
    reset_registry()
    try:
        yield site_dir
    finally:
        sys.path[:] = saved_path
        _forget_plugin_modules()
        importlib.invalidate_caches()
        reset_registry()


# -- the installed distribution ------------------------------------------------------------------
def test_entry_point_comes_from_the_installed_wheel(plugin):
    ours = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value == MODULE]
    assert len(ours) == 1, ours
    ep = ours[0]
    assert ep.name == "example_plugin"
    assert ep.dist.metadata["Name"] == DIST and ep.dist.version == VERSION
    module = importlib.import_module(MODULE)
    assert Path(module.__file__).resolve().is_relative_to(plugin.resolve())  # the wheel's copy, not the sources
    assert (Path(module.__file__).parent / "conf" / "plan" / "text_relevance_25.yaml").is_file()  # package data


def test_tokenreduce_list_shows_the_scorer_with_its_distribution(plugin, tmp_path, capsys):
    assert main(["list", f"out_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if f" {SCORER} " in line)
    assert "scorer" in row and f"{DIST} {VERSION}" in row
    listed = json.loads((tmp_path / "results.json").read_text())["components"]
    entry = next(c for c in listed if c["name"] == SCORER)
    assert entry["kind"] == "scorer"
    assert entry["origin"] == f"{DIST} {VERSION} (entry point 'example_plugin')"
    assert entry["summary"].startswith("Cosine similarity of each visual token")
    # built-ins keep their own origin
    assert next(c for c in listed if c["name"] == "topk")["origin"].startswith("builtin:")


# -- the scorer against a reference ----------------------------------------------------------------
def _reference_scores(visual: torch.Tensor, question: torch.Tensor, reduce: str, center: bool) -> torch.Tensor:
    """Obvious float64 reference for one sample: ``visual`` ``[n, d]``, ``question`` ``[T, d]``."""
    visual, question = visual.double(), question.double()
    if center:
        mean = visual.mean(0)
        visual, question = visual - mean, question - mean

    def cos(a, b):  # [n, d], [m, d] -> [n, m]
        return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T).clamp(min=1e-12)

    if reduce == "mean":
        return cos(visual, question.mean(0, keepdim=True))[:, 0]
    return cos(visual, question).max(-1).values


def _synthetic_view(dtype=torch.float32) -> tuple[TokenView, list[dict]]:
    """Five left-padded samples, S = 12, with different layouts; returns the view and, per
    sample, its visual slots and the slots that should form its question."""
    layouts = [
        # padding, visual slots, question slots (what question_mask must pick)
        dict(pad=2, visual=[3, 4, 5, 6, 7], question=[8, 9, 10, 11]),  # text before and after
        dict(pad=0, visual=list(range(1, 9)), question=[9, 10, 11]),  # the longest candidate list
        dict(pad=4, visual=[6, 7, 8, 9, 10, 11], question=[4, 5]),  # ends with the image: text before
        dict(pad=0, visual=[0, 1, 2, 9, 10, 11], question=[3, 4, 5, 6, 7, 8]),  # visual at slot 0, two images
        dict(pad=6, visual=[6, 7, 8, 9, 10, 11], question=[]),  # no text at all: scores 0
    ]
    b, s, d = len(layouts), 12, 6
    n = max(len(lay["visual"]) for lay in layouts)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(b, s, d, generator=gen) + 0.5).to(dtype)  # an offset: a shared direction, as in LLMs
    valid = torch.zeros(b, s, dtype=torch.bool)
    visual_index = torch.zeros(b, n, dtype=torch.long)
    visual_valid = torch.zeros(b, n, dtype=torch.bool)
    for i, lay in enumerate(layouts):
        valid[i, lay["pad"] :] = True
        visual_index[i, : len(lay["visual"])] = torch.tensor(lay["visual"])
        visual_valid[i, : len(lay["visual"])] = True
    view = TokenView(
        layer=2,
        stage=0,
        hidden=hidden,
        valid=valid,
        visual_index=visual_index,
        visual_valid=visual_valid,
        original_index=torch.where(visual_valid, visual_index, -1),
        n_original_visual=visual_valid.sum(-1),
        signals=None,
    )
    return view, layouts


SETTINGS = [
    dict(reduce="mean", center=False),
    dict(reduce="max", center=False),
    dict(reduce="mean", center=True),
    dict(reduce="max", center=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['reduce']}-center{int(s['center'])}")
def test_scores_equal_reference_on_ragged_left_padded_batch(plugin, settings):
    compiled = tokenreduce.build_plan({"stages": [{"layer": 2, "keep": 2, "scorer": {"name": SCORER, **settings}}]})
    scorer = compiled.stages[0].scorer
    assert type(scorer).__module__ == MODULE and scorer.needs == tokenreduce.Need.HIDDEN
    view, layouts = _synthetic_view()
    scores = scorer.score(view)
    assert scores.dtype == torch.float32 and scores.shape == view.visual_valid.shape
    assert torch.all(scores[~view.visual_valid] == 0)
    plugin_module = importlib.import_module(MODULE)
    question = plugin_module.question_mask(view)
    for i, lay in enumerate(layouts):
        assert torch.nonzero(question[i]).flatten().tolist() == lay["question"], f"sample {i}"
        n = len(lay["visual"])
        if not lay["question"]:
            assert torch.all(scores[i] == 0), f"sample {i} has no text: every score is 0"
            continue
        expected = _reference_scores(view.hidden[i, lay["visual"]], view.hidden[i, lay["question"]], **settings)
        torch.testing.assert_close(scores[i, :n].double(), expected, atol=1e-5, rtol=0, msg=f"sample {i}")
        # each sample alone gives the same scores as in the batch
        alone = TokenView(
            layer=2,
            stage=0,
            hidden=view.hidden[i : i + 1],
            valid=view.valid[i : i + 1],
            visual_index=view.visual_index[i : i + 1, :n],
            visual_valid=view.visual_valid[i : i + 1, :n],
            original_index=view.original_index[i : i + 1, :n],
            n_original_visual=view.n_original_visual[i : i + 1],
            signals=None,
        )
        torch.testing.assert_close(scorer.score(alone)[0], scores[i, :n], atol=1e-6, rtol=0)


def test_low_precision_hidden_states_give_float32_scores(plugin):
    scorer = tokenreduce.build_plan({"stages": [{"layer": 0, "keep": 2, "scorer": SCORER}]}).stages[0].scorer
    view, layouts = _synthetic_view(torch.bfloat16)
    scores = scorer.score(view)
    assert scores.dtype == torch.float32
    lay = layouts[0]
    expected = _reference_scores(view.hidden[0, lay["visual"]], view.hidden[0, lay["question"]], "mean", False)
    torch.testing.assert_close(scores[0, : len(lay["visual"])].double(), expected, atol=1e-5, rtol=0)


def test_settings_are_validated_with_their_path(plugin):
    def plan(scorer):
        return {"stages": [{"layer": 2, "keep": 4, "scorer": scorer, "selector": "topk"}]}

    with pytest.raises(PlanError, match=r"stages\.0\.scorer\.reduc: unknown key 'reduc'; allowed keys: center, reduce"):
        tokenreduce.build_plan(plan({"name": SCORER, "reduc": "max"}))
    with pytest.raises(PlanError, match=r"stages\.0\.scorer\.reduce: .*'mean' or 'max'"):
        tokenreduce.build_plan(plan({"name": SCORER, "reduce": "median"}))
    settings = tokenreduce.build_plan(plan({"name": SCORER, "reduce": "max", "center": True})).stages[0].scorer.settings
    assert (settings.reduce, settings.center) == ("max", True)


# -- inside generate() on a tiny LLaVA -------------------------------------------------------------
@pytest.mark.parametrize(
    "settings", [dict(reduce="mean", center=False), dict(reduce="max", center=True)], ids=["mean", "max-center"]
)
def test_generate_keeps_the_reference_top_k(plugin, settings):
    from tokenreduce.testing.tiny import IMAGE_TOKEN_ID, build_tiny, make_inputs

    layer, keep = 2, 5
    model = build_tiny("llava", text_layers=4)
    prompts = [
        "USER: <image> what color is the shape? ASSISTANT:",
        "USER: <image> is the red shape a circle or a square or a triangle? ASSISTANT:",
    ]
    inputs = make_inputs("llava", prompts)
    ids, attention = inputs["input_ids"], inputs["attention_mask"].bool()
    assert not attention[0, 0] and attention[1, 0], "the batch should be left-padded"

    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):  # registered before tokenreduce's hook, so it sees the uncut input
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == ids.shape[1] and not captured:  # the prefill call
            captured.append(hidden.detach().clone())

    plan = {"stages": [{"layer": layer, "keep": keep, "scorer": {"name": SCORER, **settings}, "selector": "topk"}]}
    handle = model.model.language_model.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), tokenreduce.apply(model, plan) as att:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 2
    assert len(captured) == 1
    hidden = captured[0]  # [B, S, d] entering layer 2, before the cut
    (stage,) = att.trace.stages
    for b in range(ids.shape[0]):
        visual = torch.nonzero(ids[b] == IMAGE_TOKEN_ID).flatten()  # [16] positions in the padded input
        question = [p for p in range(ids.shape[1]) if attention[b, p] and p > int(visual.max())]
        scores = _reference_scores(hidden[b, visual], hidden[b, question], **settings)
        ranked = sorted(range(len(visual)), key=lambda j: (-float(scores[j]), j))
        margin = float(scores[ranked[keep - 1]] - scores[ranked[keep]])
        assert margin > 1e-5, f"sample {b}: the reference top-{keep} is a near tie ({margin:g}); pick other inputs"
        expected = sorted(int(visual[j]) for j in ranked[:keep])
        assert stage.visual_before[b] == 16 and stage.visual_after[b] == keep
        assert stage.kept[b] == expected, f"sample {b}"


# -- from Hydra overrides (the CLI) ----------------------------------------------------------------
def _run_outputs(folder: Path) -> tuple[dict, dict]:
    return yaml.safe_load((folder / "config.yaml").read_text()), json.loads((folder / "results.json").read_text())


def test_cli_override_swaps_in_the_plugin_scorer(plugin, tmp_path, capsys):
    out = tmp_path / "run"
    # plan=demo: uniform half before layer 1, then the top quarter by `norm` before layer 3 -> text_relevance
    argv = [
        "run",
        "plan=demo",
        f"plan.stages.1.scorer={{name: {SCORER}, reduce: max}}",
        *TINY,
        "run.max_new_tokens=2",
        f"out_dir={out}",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    # a preset changed by overrides is named (and described) by what it now does
    name = f"uniform@1:50%+{SCORER}@3:25%orig"
    assert f"with plan {name}: " in capsys.readouterr().out
    config, results = _run_outputs(out)
    assert config["resolved_plans"][name]["stages"][1]["scorer"] == {"name": SCORER, "reduce": "max"}
    assert "plan=demo changed by plan.stages.1.scorer=" in config["resolved_plans"][name]["description"]
    assert results["trace"]["visual_per_layer"] == [[16, 8, 8, 4]]

    # a plain name works on a stage that has a scorer; on one that has none (uniform_25), add it with `+`
    out = tmp_path / "uniform"
    argv = [
        "run",
        "plan=uniform_25",
        f"+plan.stages.0.scorer={SCORER}",
        "plan.stages.0.selector=topk",
        *TINY,
        "run.max_new_tokens=2",
        "run.vanilla=false",
        f"out_dir={out}",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    config, results = _run_outputs(out)
    stage = config["resolved_plans"][f"{SCORER}@0:25%"]["stages"][0]  # defaults left out: topk is the default selector
    assert stage["scorer"] == {"name": SCORER} and "selector" not in stage
    assert config["plan"]["stages"][0]["selector"] == "topk"
    assert results["trace"]["visual_per_layer"] == [[4, 4, 4, 4]]


def test_cli_typo_in_a_plugin_setting_names_the_path(plugin, capsys):
    argv = ["run", "plan=demo", f"plan.stages.1.scorer={{name: {SCORER}, centre: true}}", *TINY, "run.max_new_tokens=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stages.1.scorer.centre" in err and "allowed keys: center, reduce" in err


def test_cli_runs_the_preset_shipped_in_the_package(plugin, tmp_path, capsys):
    """``plan=text_relevance_25`` needs nothing but the installed package (its ``tokenreduce.conf``
    entry point names the config folder)."""
    out = tmp_path / "preset"
    argv = ["run", "plan=text_relevance_25", *TINY, "run.max_new_tokens=2", "run.vanilla=false", f"out_dir={out}"]
    assert main(argv) == 0, capsys.readouterr().err
    config, results = _run_outputs(out)
    assert config["choices"]["plan"] == "text_relevance_25"
    assert config["resolved_plans"]["text_relevance_25"]["stages"][0]["scorer"]["name"] == SCORER
    assert results["trace"]["visual_per_layer"] == [[16, 16, 4, 4]]


def test_the_shipped_preset_in_a_plans_list_and_in_the_listing(plugin, tmp_path, capsys):
    out = tmp_path / "flops"
    argv = ["flops", "plans=[text_relevance_25,demo]", *TINY, "flops.n_visual=16", f"out_dir={out}"]
    assert main(argv) == 0, capsys.readouterr().err
    _, results = _run_outputs(out)
    assert list(results["accounting"]) == ["vanilla", "text_relevance_25", "demo"]
    assert results["accounting"]["text_relevance_25"]["per_layer_visual"] == [16, 16, 4, 4]
    capsys.readouterr()
    assert main(["list", f"out_dir={tmp_path / 'list'}"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("text_relevance_25 "))
    assert f"[{DIST} {VERSION} (entry point 'example_plugin')]" in row
    listed = json.loads((tmp_path / "list" / "results.json").read_text())["presets"]["plan"]
    entry = next(p for p in listed if p["name"] == "text_relevance_25")
    assert entry["origin"].startswith(f"{DIST} {VERSION}") and entry["about"].startswith("text relevance")
    # Hydra's own search path still works (the preset is found once, not twice)
    searchpath = importlib.import_module(MODULE).CONF_SEARCHPATH
    argv = ["flops", f"hydra.searchpath=[{searchpath}]", "plan=text_relevance_25", *TINY, f"out_dir={tmp_path / 'sp'}"]
    assert main(argv) == 0, capsys.readouterr().err


# -- no trace left behind --------------------------------------------------------------------------
def test_registry_is_normal_without_the_fixture():
    """Runs after the tests above (file order): the plugin is gone from the path and the registry."""
    if _installed_elsewhere():
        pytest.skip(f"{DIST} is installed in this environment (e.g. pip install -e examples/...)")
    assert MODULE not in sys.modules
    assert not any(ep.value == MODULE for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert SCORER not in {c["name"] for c in tokenreduce.list_components()}
    assert "text_relevance_25" not in preset_names("plan")
