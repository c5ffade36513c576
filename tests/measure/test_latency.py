"""Latency benchmark on a tiny model: structure and bookkeeping (timings are never asserted)."""

import json
import math

import pytest
import torch

from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.measure.flops import account
from tokenreduce.measure.latency import (
    BenchSettings,
    PeakMemory,
    _config_at_depth,
    _decoder_adapter,
    benchmark,
    count_tokens,
    format_si,
    summarize,
    time_generate,
    time_layer,
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
    assert 0 < t.prefill_s <= t.ttft_s <= t.e2e_s and t.decode_s_per_token > 0


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
    assert vanilla.separate_prefill_s is None  # prefill is timed once per run, inside generate()
    for c in res.configs:  # the in-generate prefill is part of the time to first token
        assert all(0 < p <= t for p, t in zip(c.prefill_s.values, c.ttft_s.values))
    assert vanilla.visual_per_layer == [16, 16, 16, 16] and vanilla.stages_s.median == 0.0
    assert demo.visual_per_layer == [16, 8, 8, 4] and demo.layer_average == 9.0
    assert uniform.visual_per_layer == [4, 4, 4, 4]
    assert set(demo.speedup) == {"prefill", "ttft", "decode", "e2e"}
    assert demo.stages_s.median > 0 and len(demo.stages_s.values) == 2  # the stages ran once per run, timed
    # the FLOP-ratio limit: vanilla true FLOPs / plan true FLOPs, from the accounting of the trace
    assert demo.accounting["per_layer_visual"] == [16, 8, 8, 4]
    assert demo.flop_ratio_limit == pytest.approx(vanilla.accounting["flops_true"] / demo.accounting["flops_true"])
    assert uniform.flop_ratio_limit > demo.flop_ratio_limit > 1.0
    for c in (demo, uniform):  # without the stages' FLOPs: the model at the reduced counts only
        acc = c.accounting
        no_stages = acc["flops_true"] - acc["scorer_flops_true"] - acc["selector_flops_true"]
        assert c.flop_ratio_limit_no_stages == pytest.approx(vanilla.accounting["flops_true"] / no_stages)
        assert c.flop_ratio_limit_no_stages >= c.flop_ratio_limit
        assert c.limit_fraction["with_stages"] == pytest.approx(c.speedup["prefill"] / c.flop_ratio_limit)
        assert c.limit_fraction["without_stages"] == pytest.approx(c.speedup["prefill"] / c.flop_ratio_limit_no_stages)
    assert vanilla.flop_ratio_limit is None and vanilla.limit_fraction == {} and res.compose is None
    assert res.inputs["n_visual"] == [16, 16] and res.inputs["n_text"] == [12, 12]
    data = json.loads(json.dumps(res.to_dict()))  # JSON-able, and complete
    assert {"prefill_s", "separate_prefill_s", "stages_s", "flop_ratio_limit", "flop_ratio_limit_no_stages"} <= set(
        data["configs"][1]
    )
    assert data["configs"][1]["limit_fraction"].keys() == {"with_stages", "without_stages"}
    table = res.table()
    assert "x/no-stage limit" in table and "stages ms" in table and "uniform_25" in table
    assert "sep. prefill ms" not in table


def test_separate_prefill_mode(tiny):
    inputs = tiny.synthetic_inputs(batch_size=1, n_text=8)
    settings = BenchSettings(warmup=0, repeats=2, max_new_tokens=2, prefill=True, progress=False)
    res = benchmark(tiny.model, inputs, {"demo": "demo"}, settings)
    for c in res.configs:
        assert len(c.separate_prefill_s.values) == 2 and len(c.prefill_s.values) == 2
    assert "sep. prefill ms" in res.table()


def test_compose_numbers_are_consistent(tiny):
    inputs = tiny.synthetic_inputs(batch_size=1, n_text=12)
    settings = BenchSettings(warmup=0, repeats=2, max_new_tokens=2, progress=False, threads=1, compose_layers=8)
    res = benchmark(tiny.model, inputs, {"demo": "demo", "uniform_25": "uniform_25"}, settings)
    comp = res.compose
    assert comp.n_layers == 8 and comp.model_layers == 4
    t = {n: s.median for n, s in comp.layer_s.items()}
    fixed = comp.fixed_s.median
    vanilla, demo, uniform = comp.configs
    assert [c.name for c in comp.configs] == ["vanilla", "demo", "uniform_25"]
    # vanilla = fixed + L x t(N0), N0 = 12 text + 16 visual
    assert vanilla.per_layer_tokens == [28] * 8 and vanilla.stages_s == 0.0
    assert vanilla.prefill_s == pytest.approx(fixed + 8 * t[28])
    # a plan = fixed + sum of t(N_l) over the plan's counts at 8 layers + its measured stage time
    measured = {c.name: c for c in res.configs}
    for row in (demo, uniform):
        plan = build_plan(row.name, n_layers=8)
        assert row.per_layer_tokens == [12 + v for v in plan.plan.visual_per_layer(16, 8)]
        assert row.stages_s == measured[row.name].stages_s.median
        assert row.decoder_s == pytest.approx(sum(t[n] for n in row.per_layer_tokens))
        assert row.prefill_s == pytest.approx(fixed + row.decoder_s + row.stages_s)
        assert row.speedup == pytest.approx(vanilla.prefill_s / row.prefill_s)
        # the check: the same composition at the model's own depth, with the trace's counts
        at4 = fixed + row.stages_s + sum(t[12 + v] for v in measured[row.name].visual_per_layer)
        assert row.check["composed_s"] == pytest.approx(at4)
        assert row.check["measured_s"] == measured[row.name].prefill_s.median
        # FLOP-ratio limits of the 8-layer config
        deep = _config_at_depth(tiny.model.config, 8)
        base = account(deep, None, n_visual=16, n_text=12, kv_dtype_bytes=4)
        acc = account(deep, plan, n_visual=16, n_text=12, kv_dtype_bytes=4)
        assert row.flop_ratio_limit == pytest.approx(base.flops_true / acc.flops_true)
        assert row.limit_fraction["with_stages"] == pytest.approx(row.speedup / row.flop_ratio_limit)
    assert vanilla.check["composed_s"] == pytest.approx(fixed + 4 * t[28])
    assert set(t) == {28, 20, 16}  # every count the plans pass through, at 8 and at 4 layers
    assert tiny.model.config.text_config.num_hidden_layers == 4  # the model's config is untouched
    data = json.loads(json.dumps(res.to_dict()))
    assert data["compose"]["method"].startswith("composed prefill at L decoder layers")
    assert "prefill@8 ms" in comp.table() and any("assumptions" in line for line in comp.describe())


def test_compose_refuses_a_plan_deeper_than_the_target_before_timing(tiny):
    inputs = tiny.synthetic_inputs(batch_size=1, n_text=8)
    settings = BenchSettings(repeats=1, progress=False, compose_layers=2)
    with pytest.raises(PlanError, match="compose_layers=2: plan 'demo' does not fit 2 layers"):
        benchmark(tiny.model, inputs, {"demo": "demo"}, settings)
    with pytest.raises(ValueError, match="compose_layers"):
        BenchSettings(compose_layers=0)


def test_time_layer(tiny):
    adapter = _decoder_adapter(tiny.model)
    s = time_layer(adapter, 20, batch_size=2, repeats=2, warmup=0)
    assert len(s.values) == 2 and s.min > 0
    with pytest.raises(ValueError, match="n_tokens"):
        time_layer(adapter, 0)


def test_benchmark_vanilla_only_and_bad_plan(tiny):
    inputs = tiny.synthetic_inputs(batch_size=1, n_text=8)
    res = benchmark(tiny.model, inputs, {}, BenchSettings(warmup=0, repeats=1, max_new_tokens=2, progress=False))
    assert [c.name for c in res.configs] == ["vanilla"] and res.configs[0].separate_prefill_s is None

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
