"""The Qwen2.5-VL-7B and LLaVA-NeXT-7B presets run inside generate() on tiny models of the real
depth (28 / 32 decoder layers), with the keep counts the plan arithmetic promises per sample."""

from __future__ import annotations

import pytest

import tokenreduce
from tokenreduce.core.presets import load_preset
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
TARGET = {33: 1 / 3, 22: 2 / 9, 11: 1 / 9}
CASES = {"qwen_pio": ("qwen2_5_vl", 28), "next_pio": ("llava_next", 32)}


@pytest.fixture(scope="module", params=list(CASES))
def family(request):
    kind, depth = CASES[request.param]
    return request.param, kind, build_tiny(kind, text_layers=depth)


@pytest.mark.parametrize("pct", [33, 22, 11])
def test_preset_runs_with_its_budget(family, pct):
    prefix, kind, model = family
    plan = load_preset(f"{prefix}_{pct}")
    inputs = make_inputs(kind, [PROMPT, PROMPT], image_sizes=[(112, 112), (100, 80)])
    with tokenreduce.apply(model, plan) as att:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    depth = model.config.text_config.num_hidden_layers
    for b, n in enumerate(att.trace.original_visual):
        assert [st.visual_after[b] for st in att.trace.stages] == plan.keep_counts(n, depth)
        assert att.trace.layer_average(b) == pytest.approx(plan.layer_average_for(n, depth))
        # integer keep counts on a few dozen tokens: within a few percent of the target fraction
        assert att.trace.layer_average(b) / n == pytest.approx(TARGET[pct], abs=0.03)
