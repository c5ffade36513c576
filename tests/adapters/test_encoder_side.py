"""Encoder-side reduction (visionzip, scope, holov, pio_ve) on tiny models: the vision-tower
signals against an eager reference, the presets inside ``generate()`` (counts, determinism,
batch = single runs), merged tokens reaching the LLM, composition with LLM-side stages, and
the clear refusals (Qwen2.5-VL, stages after layer 0)."""

from __future__ import annotations

import json

import pytest
import torch
from llava576 import DEPTH, N_VISUAL, PROMPTS, llava, llava_inputs
from pydantic import BaseModel, ConfigDict
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.cli import main
from tokenreduce.core.errors import PlanError
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import Need, Selection
from tokenreduce.strategies.visionzip import VisionZipSelector
from tokenreduce.testing.tiny import build_tiny, make_inputs

STEPS = 3
_CACHE: dict = {}  # this module's runs, shared by several tests
METHODS = ("visionzip", "scope", "holov", "pio_ve")
PRESETS = [f"{m}_{b}" for m in METHODS for b in (192, 128, 64)] + ["visionzip_pio"]


def tiny_plan(name: str) -> dict:
    """The preset, with pio_ve's local scan moved to CLIP layer 0 (the tiny tower has 2 layers;
    the preset's layer 5 would be refused as out of range)."""
    plan = load_preset(name).model_dump(exclude_none=True)
    for st in plan["stages"]:
        if st["selector"]["name"] == "pio_ve":
            st["selector"]["local_layer"] = 0
    return plan


def generate(model, inputs, plan, registry=None):
    with tokenreduce.apply(model, plan, registry=registry) as att:
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits, 1), att.trace


# -- the signals against an eager reference -------------------------------------------------------------
RECORDED: list = []


class RecordingSelector:
    """Reads every vision signal, records it, keeps the first ``keep`` candidates."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    needs = Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    needs_scores = False

    def __init__(self, settings):
        self.settings = settings

    def vision_layers(self):
        return None  # capture every layer

    def select(self, view, scores, keep):
        s = view.signals
        RECORDED.append(
            {
                **{
                    ("cls", layer, heads): s.vision_cls_attention(layer, heads)
                    for layer in (0, 1, -1)
                    for heads in ("sum", "mean")
                },
                **{
                    ("keys", layer, heads): s.vision_keys(layer, heads)
                    for layer in (0, -2)
                    for heads in ("mean", "concat")
                },
                "features": s.vision_features(),
                "cls_features": s.vision_cls_features(),
                "projected": s.project_vision(s.vision_features()),
                "hidden": view.visual_hidden(),
                "valid": view.visual_valid,
            }
        )
        return Selection.from_mask(torch.arange(view.visual_valid.shape[1]).unsqueeze(0) < keep.unsqueeze(1))


RECORDING = registry_with("encoder_signals", selectors={"record_vision": RecordingSelector})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vision_signals_equal_the_eager_attention_maps(attn):
    model = build_tiny("llava", attn_implementation=attn)  # 16 patches, 2 CLIP layers
    reference = build_tiny("llava", attn_implementation="eager")  # same weights (same seed)
    inputs = make_inputs("llava", ["USER: <image> what color is the shape? ASSISTANT:", "<image> shape?"])
    RECORDED.clear()
    plan = {"stages": [{"layer": 0, "keep": 5, "selector": "record_vision"}]}
    with tokenreduce.apply(model, plan, registry=RECORDING):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    got = RECORDED[0]
    keys = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out))
        for i, layer in enumerate(reference.model.vision_tower.encoder.layers)
    ]
    with torch.no_grad():
        out = reference.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert model.config.vision_config._attn_implementation == attn  # never switched to eager
    for layer in (0, 1, -1):
        attn_map = out.attentions[layer][:, :, 0, 1:]  # [images, heads, patches]
        torch.testing.assert_close(got[("cls", layer, "sum")], attn_map.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[("cls", layer, "mean")], attn_map.mean(1), atol=1e-5, rtol=1e-5)
    heads = reference.config.vision_config.num_attention_heads
    for layer, index in ((0, 0), (-2, 0)):
        k = keys[index][:, 1:]
        torch.testing.assert_close(got[("keys", layer, "concat")], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            got[("keys", layer, "mean")], k.view(*k.shape[:2], heads, -1).mean(2), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(got["features"], out.hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)
    cls = out.hidden_states[-2][:, :1].expand_as(got["features"])  # one image per sample
    torch.testing.assert_close(got["cls_features"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["projected"], got["hidden"], atol=1e-5, rtol=1e-5)  # = what the LLM receives


# -- the presets inside generate() -------------------------------------------------------------------------
def batch_run(name):
    key = ("batch", name)
    if key not in _CACHE:
        _CACHE[key] = generate(llava(), llava_inputs(PROMPTS), tiny_plan(name))
    return _CACHE[key]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_in_generate_shows_the_preset_counts(name):
    plan = load_preset(name)
    counts = plan.keep_counts(N_VISUAL, DEPTH)
    _, _, trace = batch_run(name)
    assert [st.layer for st in trace.stages] == [s.layer for s in plan.stages]
    assert [st.visual_before for st in trace.stages] == [[n, n] for n in [N_VISUAL] + counts[:-1]]
    assert [st.visual_after for st in trace.stages] == [[k, k] for k in counts]
    assert trace.layer_average(0) == trace.layer_average(1) == plan.layer_average_for(N_VISUAL, DEPTH)


# the 64-token presets and the composition in the default suite, the rest with -m slow
BATCH_CASES = [
    n if n.endswith("_64") or n == "visionzip_pio" else pytest.param(n, marks=pytest.mark.slow) for n in PRESETS
]


@pytest.mark.parametrize("name", BATCH_CASES)
def test_preset_batch_equals_single_runs(name):
    model = llava()
    seq, logits, trace = batch_run(name)
    width = llava_inputs(PROMPTS)["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = llava_inputs([prompt], seed=i)
        s_seq, s_logits, s_trace = generate(model, single, tiny_plan(name))
        pad = width - single["input_ids"].shape[1]
        assert seq[i, width:].tolist() == s_seq[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[i], s_logits[0], atol=1e-4, rtol=1e-4)
        for st, s_st in zip(trace.stages, s_trace.stages):
            assert st.kept[i] == [p + pad for p in s_st.kept[0]]


@pytest.mark.parametrize("name", [f"{m}_128" for m in METHODS])
def test_preset_is_deterministic_and_reduces(name):
    seq, logits, trace = batch_run(name)
    seq2, logits2, trace2 = generate(llava(), llava_inputs(PROMPTS), tiny_plan(name))
    assert torch.equal(seq, seq2) and torch.equal(logits, logits2)
    assert [st.kept for st in trace2.stages] == [st.kept for st in trace.stages]
    _, ref_logits, _ = batch_run("keep_all")
    assert not torch.allclose(logits, ref_logits)


@pytest.mark.parametrize("name", ["visionzip_64", "pio_ve_64"])
def test_preset_under_eager_attention(name):
    model = llava("eager")
    counts = load_preset(name).keep_counts(N_VISUAL, DEPTH)
    _, _, trace = generate(model, llava_inputs(PROMPTS), tiny_plan(name))
    assert [st.visual_after for st in trace.stages] == [[k, k] for k in counts]
    assert model.config.vision_config._attn_implementation == "eager"


# -- merged tokens reach the LLM ---------------------------------------------------------------------------
SELECTIONS: list[Selection] = []


class RecordingVisionZip(VisionZipSelector):
    def select(self, view, scores, keep):
        sel = super().select(view, scores, keep)
        SELECTIONS.append((sel, view.visual_hidden()))
        return sel


REGISTRY = registry_with("visionzip_gen", selectors={"rec_visionzip": RecordingVisionZip})


def test_visionzip_contextual_tokens_enter_the_first_layer():
    model = llava()
    plan = load_preset("visionzip_64").model_dump(exclude_none=True)
    plan["stages"][0]["selector"]["name"] = "rec_visionzip"
    seen = {}

    def grab(module, args, kwargs):  # registered after the attachment's hook: sees the reduced input
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            seen["hidden"] = hidden.detach().clone()

    SELECTIONS.clear()
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**llava_inputs(PROMPTS))
        finally:
            handle.remove()
    sel, original = SELECTIONS[0]
    assert att.trace.stages[0].visual_after == [64, 64]
    with torch.no_grad():
        out = model.model.vision_tower(llava_inputs(PROMPTS)["pixel_values"], output_hidden_states=True)
        cls = model.model.multi_modal_projector(out.hidden_states[-2][:, 0])  # [images, d]
    for b in range(2):
        rows = seen["hidden"][b]
        patches = 0
        for j in range(64):
            assert float((rows - sel.hidden[b, j]).abs().amax(-1).min()) == 0.0
            patches += bool((original[b] == sel.hidden[b, j]).all(-1).any())
        torch.testing.assert_close(sel.hidden[b, 0], cls[b], atol=1e-5, rtol=1e-5)  # the CLS token first
        assert patches == 53  # official 64 = CLS + 53 dominant patches (unchanged) + 10 contextual


# -- composition and refusals ------------------------------------------------------------------------------
def test_composition_from_command_line_overrides(tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "plan=visionzip_pio",
        "plan.stages.0.keep=8",
        "plan.stages.0.selector.contextual=2",
        "plan.stages.1.layer=2",
        "plan.stages.1.keep=4",
        "model=tiny_llava",
        "model.text_layers=4",
        "model.image_size=56",
        "run.max_new_tokens=2",
        f"out_dir={out}",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trace"]["visual_per_layer"] == [[8, 8, 4, 4]]


def test_vision_hooks_are_removed_on_detach():
    model = build_tiny("llava")
    tower = model.model.vision_tower
    before = len(tower._forward_pre_hooks) + sum(len(layer._forward_pre_hooks) for layer in tower.encoder.layers)
    with tokenreduce.apply(
        model, {"stages": [{"layer": 0, "keep": 4, "scorer": "vision_cls", "selector": "visionzip"}]}
    ):
        during = len(tower._forward_pre_hooks) + sum(len(layer._forward_pre_hooks) for layer in tower.encoder.layers)
    after = len(tower._forward_pre_hooks) + sum(len(layer._forward_pre_hooks) for layer in tower.encoder.layers)
    assert during > before == after


def test_qwen_refuses_cls_methods_when_the_plan_is_built():
    model = build_tiny("qwen2_5_vl")
    for name in ("visionzip_64", "scope_64", "holov_64", {"stages": [{"layer": 0, "keep": 8, "selector": "pio_ve"}]}):
        with pytest.raises(PlanError, match="Qwen2_5_VLAdapter adapter cannot provide.*(no CLS token|vision features)"):
            tokenreduce.apply(model, name)


def test_vision_signals_need_a_layer_zero_stage():
    model = build_tiny("llava")
    with pytest.raises(PlanError, match="layer 0"):
        tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 4, "scorer": "vision_cls", "selector": "topk"}]})
