"""The baseline presets (pdrop, sparsevlm, dart, divprune) inside ``generate()``.

On a tiny LLaVA-1.5 with the real geometry of LLaVA-1.5-7B's budget arithmetic (32 decoder
layers, 576 visual tokens: 336 px images, 14 px patches), each preset runs unchanged: the trace
shows the preset's keep counts and layer average, two runs are identical, and a left-padded batch
of two equals the single runs.  The same methods also run on the tiny LLaVA-NeXT (ragged visual
counts) and Qwen2.5-VL with the presets' budgets as ratios of the original count.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from llava576 import DEPTH, N_VISUAL, PROMPTS, llava, llava_inputs
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import Selection
from tokenreduce.strategies.sparsevlm import SparseVLMSelector
from tokenreduce.testing.tiny import build_tiny, make_inputs

METHODS = ("pdrop", "sparsevlm", "dart", "divprune")
PRESETS = [f"{m}_{b}" for m in METHODS for b in (64, 128, 192)]
STEPS = 3
_CACHE: dict = {}  # this module's runs, shared by several tests


def generate(model, inputs, plan, registry=None):
    with tokenreduce.apply(model, plan, registry=registry) as att:
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits, 1), att.trace


def batch_run(name: str):
    """The preset on the two-prompt batch (cached: several tests compare against it)."""
    if ("run", name) not in _CACHE:
        _CACHE["run", name] = generate(llava(), llava_inputs(PROMPTS), name)
    return _CACHE["run", name]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_in_generate_counts_and_batch_equals_single_runs(name):
    model = llava()
    plan = load_preset(name)
    counts = plan.keep_counts(N_VISUAL, DEPTH)
    batch = llava_inputs(PROMPTS)
    seq, logits, trace = batch_run(name)
    # the trace shows the preset's counts, per stage and per sample
    assert [st.layer for st in trace.stages] == [s.layer for s in plan.stages]
    assert [st.visual_before for st in trace.stages] == [[n, n] for n in [N_VISUAL] + counts[:-1]]
    assert [st.visual_after for st in trace.stages] == [[k, k] for k in counts]
    assert trace.layer_average(0) == trace.layer_average(1) == plan.layer_average_for(N_VISUAL, DEPTH)
    # a left-padded batch equals the single runs
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = llava_inputs([prompt], seed=i)
        s_seq, s_logits, s_trace = generate(model, single, name)
        pad = width - single["input_ids"].shape[1]
        assert seq[i, width:].tolist() == s_seq[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[i], s_logits[0], atol=1e-4, rtol=1e-4)
        for st, s_st in zip(trace.stages, s_trace.stages):
            assert st.kept[i] == [p + pad for p in s_st.kept[0]]


@pytest.mark.parametrize("name", [f"{m}_128" for m in METHODS])
def test_preset_is_deterministic(name):
    seq, logits, trace = batch_run(name)
    seq2, logits2, trace2 = generate(llava(), llava_inputs(PROMPTS), name)
    assert torch.equal(seq, seq2) and torch.equal(logits, logits2)
    assert [st.kept for st in trace2.stages] == [st.kept for st in trace.stages]


@pytest.mark.parametrize("name", [f"{m}_64" for m in METHODS])
def test_preset_under_eager_attention(name):
    model = llava("eager")
    counts = load_preset(name).keep_counts(N_VISUAL, DEPTH)
    _, _, trace = generate(model, llava_inputs(PROMPTS), name)
    assert [st.visual_after for st in trace.stages] == [[k, k] for k in counts]
    assert model.config.text_config._attn_implementation == "eager"  # never switched


@pytest.mark.parametrize("method", METHODS)
def test_reduction_changes_the_output(method):
    """Guard against a stage that silently keeps everything."""
    _, ref_logits, _ = batch_run("keep_all")
    _, logits, _ = batch_run(f"{method}_64")
    assert not torch.allclose(logits, ref_logits)


# -- SparseVLM's merged tokens reach the model ----------------------------------------------------------
SELECTIONS: list[Selection] = []


class RecordingSparseVLM(SparseVLMSelector):
    def select(self, view, scores, keep) -> Selection:
        sel = super().select(view, scores, keep)
        SELECTIONS.append(sel)
        return sel


REGISTRY = registry_with("sparsevlm_gen", selectors={"rec_sparsevlm": RecordingSparseVLM})


def test_sparsevlm_merged_tokens_enter_the_cut_layer():
    model = llava()
    decoder = model.model.language_model
    plan = load_preset("sparsevlm_192").model_dump()
    for st in plan["stages"]:
        st["selector"] = {"name": "rec_sparsevlm"}
    seen = {}

    def grab(module, args, kwargs):  # registered after the attachment's hook: sees the reduced input
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            seen["hidden"] = hidden.detach().clone()

    SELECTIONS.clear()
    batch = llava_inputs(PROMPTS)
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        handle = decoder.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**batch)
        finally:
            handle.remove()
    sel = SELECTIONS[0]
    assert sel.hidden is not None
    assert att.trace.stages[0].visual_after == [309, 309]
    for b in range(2):
        rows = seen["hidden"][b]  # [S', d] what layer 2 consumes
        for j in range(int(sel.valid[b].sum())):
            gap = (rows - sel.hidden[b, j]).abs().amax(-1).min()
            assert float(gap) == 0.0  # every kept row, merged anchors included, is in the layer input
    with tokenreduce.apply(
        model,
        {
            "positions": "renumber",
            "stages": [{**s, "selector": {"name": "sparsevlm", "recycle": False}} for s in plan["stages"]],
        },
    ) as att_plain:
        model(**batch)
    assert [st.visual_after for st in att_plain.trace.stages] == [st.visual_after for st in att.trace.stages]


# -- the other adapters: budgets as ratios of the original count ----------------------------------------
def ratio_plan(name: str, n_layers: int) -> dict:
    """The preset with each keep as a ratio of the original 576 and layers kept (32-layer models)."""
    plan = load_preset(name).model_dump()
    counts = load_preset(name).keep_counts(N_VISUAL, n_layers)
    for st, k in zip(plan["stages"], counts):
        st["keep"] = {"ratio": k / N_VISUAL, "of": "original"}
    return plan


@pytest.mark.parametrize(
    "kind, sizes",
    [
        ("llava_next", [(100, 80), (80, 100)]),  # different visual counts per sample (ragged)
        ("qwen2_5_vl", [(112, 112), (112, 84)]),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_other_adapters(kind, sizes, method):
    key = (kind, "model")
    if key not in _CACHE:
        _CACHE[key] = build_tiny(kind, text_layers=DEPTH)
    model = _CACHE[key]
    plan = ratio_plan(f"{method}_128", DEPTH)
    batch = make_inputs(kind, PROMPTS, image_sizes=sizes)
    seq, logits, trace = generate(model, batch, plan)
    compiled = build_plan(plan, n_layers=DEPTH)
    for b, n in enumerate(trace.original_visual):
        assert n > 0
        assert [st.visual_after[b] for st in trace.stages] == compiled.keep_counts(n)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        single = make_inputs(kind, [prompt], image_sizes=[sizes[i]], seed=i)
        s_seq, s_logits, s_trace = generate(model, single, plan)
        pad = width - single["input_ids"].shape[1]
        assert seq[i, width:].tolist() == s_seq[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[i], s_logits[0], atol=1e-4, rtol=1e-4)
        for st, s_st in zip(trace.stages, s_trace.stages):
            assert st.kept[i] == [p + pad for p in s_st.kept[0]]


# -- flash-attention (CUDA + flash-attn only) ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="flash_attention_2 needs CUDA and the flash-attn package",
)
@pytest.mark.parametrize("name", [f"{m}_128" for m in METHODS])
def test_presets_under_flash_attention_2(name):
    model = build_tiny(
        "llava",
        attn_implementation="flash_attention_2",
        dtype=torch.float16,
        image_size=336,
        patch=14,
        text_layers=DEPTH,
    ).cuda()
    batch = {k: v.cuda() for k, v in llava_inputs(PROMPTS).items()}
    batch["pixel_values"] = batch["pixel_values"].half()
    _, _, trace = generate(model, batch, name)
    counts = load_preset(name).keep_counts(N_VISUAL, DEPTH)
    assert [st.visual_after for st in trace.stages] == [[k, k] for k in counts]
    assert model.config.text_config._attn_implementation == "flash_attention_2"
