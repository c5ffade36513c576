"""Latency benchmark on a tiny model: structure and bookkeeping (timings are never asserted)."""

import json
import math

import pytest
import torch

from tokenreduce.measure.latency import (
    BenchSettings,
    PeakMemory,
    benchmark,
    count_tokens,
    format_si,
    summarize,
    time_generate,
)
from tokenreduce.models import load_model
from tokenreduce.testing.tiny import make_image


@pytest.fixture(scope="module")
def tiny():
    return load_model({"kind": "tiny", "arch": "llava", "text_layers": 4})


def test_summarize_median_spread_and_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s.median, s.min, s.max) == (3.0, 1.0, 10.0)
    assert (s.q1, s.q3) == (2.0, 4.0)
    one = summarize([0.5])
    assert one.median == one.q1 == one.q3 == 0.5
    with pytest.raises(ValueError):
        summarize([])


def test_format_si():
    assert format_si(8.45e12) == "8.45T"
    assert format_si(1.2e7) == "12M"
    assert format_si(None) == "-"


def test_time_generate_counts_steps(tiny):
    inputs = tiny.synthetic_inputs(batch_size=2, n_text=12)
    t = time_generate(tiny.model, inputs, 4, tiny.device)
    assert t.steps == 4 and t.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert 0 < t.ttft_s <= t.e2e_s and t.decode_s_per_token > 0


def test_peak_memory_reports_an_int_or_none():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(4_000_000)
        del x
    assert mem.peak_bytes is None or (isinstance(mem.peak_bytes, int) and mem.peak_bytes >= 0)
    assert mem.method.startswith(("cpu", "n/a"))


def test_benchmark_vanilla_and_plans(tiny):
    inputs = tiny.synthetic_inputs(batch_size=2, n_text=12)
    settings = BenchSettings(warmup=1, repeats=2, max_new_tokens=3, progress=False, threads=1)
    res = benchmark(tiny.model, inputs, {"demo": "demo", "uniform_25": "uniform_25"}, settings)
    names = [c.name for c in res.configs]
    assert names == ["vanilla", "demo", "uniform_25"]
    vanilla, demo, uniform = res.configs
    assert len(vanilla.e2e_s.values) == 2 and vanilla.prefill_s.min <= vanilla.prefill_s.median <= vanilla.prefill_s.max
    assert vanilla.visual_per_layer == [16, 16, 16, 16] and vanilla.select_s.median == 0.0
    assert demo.visual_per_layer == [16, 8, 8, 4] and demo.layer_average == 9.0
    assert uniform.visual_per_layer == [4, 4, 4, 4]
    assert set(demo.speedup) == {"prefill", "ttft", "decode", "e2e"}
    assert demo.select_s.median > 0  # the stages ran and were timed
    # the FLOP-ratio limit: vanilla true FLOPs / plan true FLOPs, from the accounting of the trace
    assert demo.accounting["per_layer_visual"] == [16, 8, 8, 4]
    assert demo.flop_ratio_limit == pytest.approx(vanilla.accounting["flops_true"] / demo.accounting["flops_true"])
    assert uniform.flop_ratio_limit > demo.flop_ratio_limit > 1.0
    assert res.inputs["n_visual"] == [16, 16] and res.inputs["n_text"] == [12, 12]
    json.dumps(res.to_dict())  # JSON-able
    table = res.table()
    assert "FLOP limit x" in table and "uniform_25" in table


def test_benchmark_without_prefill_and_bad_plan(tiny):
    inputs = tiny.synthetic_inputs(batch_size=1, n_text=8)
    res = benchmark(
        tiny.model, inputs, {}, BenchSettings(warmup=0, repeats=1, max_new_tokens=2, prefill=False, progress=False)
    )
    assert [c.name for c in res.configs] == ["vanilla"] and res.configs[0].prefill_s is None
    from tokenreduce.core.errors import PlanError

    with pytest.raises(PlanError, match="out of range"):
        benchmark(
            tiny.model,
            inputs,
            {"deep": {"stages": [{"layer": 9, "keep": 2, "selector": "uniform"}]}},
            BenchSettings(repeats=1, progress=False),
        )


def test_count_tokens_with_padding(tiny):
    prompts = ["USER: <image> what? ASSISTANT:", "USER: <image> what color is the shape? ASSISTANT:"]
    inputs = tiny.processor_inputs(prompts, [make_image(i) for i in range(2)])
    visual, text = count_tokens(tiny.model, inputs)
    assert visual == [16, 16]
    assert text[1] > text[0] and text[0] + visual[0] == int(inputs["attention_mask"][0].sum())
    assert not any(math.isnan(v) for v in text)
