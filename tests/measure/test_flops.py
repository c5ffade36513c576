"""FLOPs / KV-cache accounting (tokenreduce.measure.flops, .kv, .configs).

* hand-computed values on tiny configs (d=64, m=128);
* ``FlopCounterMode`` on the meta device for the three real 7B configs (decoder layers at
  different lengths, LM head, vision tower, projector): relative difference < 1e-3;
* ``FlopCounterMode`` around a real tiny prefill under plans: the scorers' own work (PIO fast
  and exact probes, FastV rows) is accounted exactly;
* the paper's vanilla figures (2.98 / 8.45 / 16.67 TFLOPs, 318 MiB) and its PIO figure (0.45 T,
  6.62x: probes counted by their forward in the paper column, their backward in the true column);
* KV bytes equal the ``DynamicCache`` tensors' real sizes after a tiny prefill under a plan.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig
from transformers.vision_utils import get_vision_window_index

import tokenreduce
from tokenreduce.adapters.qwen2_5_vl.spec import window_lengths as qwen_window_lengths
from tokenreduce.core.errors import PlanError, UnsupportedModelError
from tokenreduce.core.types import Trace
from tokenreduce.measure.configs import hf_config, model_config, real_config
from tokenreduce.measure.flops import (
    PAPER_PROBE_BACKWARD_FACTOR,
    account,
    count_with_flop_counter,
    layer_flops_paper,
    layer_flops_true,
    text_dims,
)
from tokenreduce.measure.kv import cache_bytes, cache_tokens, kv_bytes
from tokenreduce.strategies.pio import pio_probe_flops
from tokenreduce.testing.tiny import build_tiny, llava_config, make_inputs

REAL = ["llava_1_5_7b", "llava_next_7b", "qwen2_5_vl_7b"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1.0)


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks refuse
    ``torch.autograd.grad`` (the PIO probe); counting per module is not needed here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


# ---------------------------------------------------------------------------------------------
# hand-computed values


def tiny_llava_config(layers: int = 2, kv_heads: int = 4):
    # text: d=64, m=128, 4 heads, vocab 1000; vision: CLIP width 32, MLP 64, 2 layers, 56 px / 14 px
    return llava_config(text_layers=layers, hidden_size=64, intermediate_size=128, num_key_value_heads=kv_heads)


def test_per_layer_formulas_by_hand():
    dims = text_dims(tiny_llava_config())
    # 2*(4nd^2 + 2n^2d + 3ndm), n=26, d=64, m=128: 2*(425984 + 86528 + 638976)
    assert layer_flops_true(26, dims) == 2_302_976
    # 4nd^2 + 2n^2d + 2ndm, n=16: 262144 + 32768 + 262144
    assert layer_flops_paper(16, 64, 128) == 557_056
    gqa = text_dims(tiny_llava_config(kv_heads=2))  # q width 64, k/v width 32
    # n=10: 2*(10*64*64 + 2*10*64*32 + 10*64*64) + 4*100*64 + 2*3*10*64*128
    assert layer_flops_true(10, gqa) == 245_760 + 25_600 + 491_520


def test_account_tiny_by_hand():
    plan = {"stages": [{"layer": 1, "keep": 4, "scorer": "norm", "selector": "topk"}]}
    acc = account(tiny_llava_config(), plan, n_visual=16, n_text=10)
    assert acc.per_layer_visual == [16, 4]
    assert acc.per_layer_tokens == [26, 14]
    assert acc.layer_average == 10.0
    assert acc.llm_flops_true == 2_302_976 + 1_197_056  # layers at n=26 and n=14
    assert acc.lm_head_flops_true == 2 * 64 * 1000  # last position only
    # CLIP: conv 2*16*(3*14*14)*32 + 2 layers * 2*(4*17*32^2 + 2*17^2*32 + 2*17*32*64)
    assert acc.vision_flops_true == 602_112 + 2 * 315_520
    assert acc.projector_flops_true == 2 * 16 * (32 * 64 + 64 * 64)
    assert acc.scorer_flops_true == 0 and acc.scorer_flops_paper == 0  # norm: element-wise only
    assert acc.flops_true == 3_500_032 + 128_000 + 1_233_152 + 196_608
    assert acc.flops_paper == 557_056 + 133_120  # f(16) + f(4)
    assert acc.kv_bytes == 2 * (26 + 14) * 64 * 2  # fp16
    gqa = account(tiny_llava_config(kv_heads=2), plan, n_visual=16, n_text=10, kv_dtype_bytes=4)
    assert gqa.kv_bytes == 2 * (26 + 14) * 32 * 4
    d = acc.to_dict()
    assert "2 per multiply-add" in d["conventions"]["flops_true"]
    assert "visual tokens" in d["conventions"]["flops_paper"]
    assert d["stages"][0]["scorer"] == "norm"


def test_scorer_costs_by_hand():
    cfg = tiny_llava_config()
    fast = account(cfg, {"stages": [{"layer": 1, "keep": 4, "scorer": "pio", "selector": "topk"}]}, 16, 10)
    # S=26 tokens, R=4 loss rows. forward: k,v 2*2*26*64*64 + q,o 2*2*4*64*64 + MLP 2*3*4*64*128
    # + attention 4*4*26*64 + LM head 2*4*64*1000 = 688128 + 26624 + 512000;
    # backward (input gradients only): the same, attention twice
    assert fast.scorer_flops_true == (688_128 + 26_624 + 512_000) + (688_128 + 2 * 26_624 + 512_000)
    assert fast.scorer_flops_paper == 557_056  # the paper's rule: the probe forward f(16) only
    with_backward = account(
        cfg,
        {"stages": [{"layer": 1, "keep": 4, "scorer": "pio", "selector": "topk"}]},
        16,
        10,
        probe_backward_factor=2.0,
    )
    assert with_backward.scorer_flops_paper == 3 * 557_056  # f(16) forward + 2 x f(16) backward
    assert with_backward.scorer_flops_true == fast.scorer_flops_true  # the factor is paper-only
    fastv = account(cfg, {"stages": [{"layer": 1, "keep": 4, "scorer": "fastv", "selector": "topk"}]}, 16, 10)
    # one query and its 26 scores; the keys of layer 0 come from the KV cache
    assert fastv.scorer_flops_true == 2 * 64 * 64 + 2 * 26 * 64
    own = {"name": "fastv", "layer_offset": 0}  # the cut layer's own keys are recomputed
    fastv0 = account(cfg, {"stages": [{"layer": 1, "keep": 4, "scorer": own, "selector": "topk"}]}, 16, 10)
    assert fastv0.scorer_flops_true == 2 * 26 * 64 * 64 + 2 * 64 * 64 + 2 * 26 * 64
    assert fastv.scorer_flops_paper == 16 * 64 * 64 + 16 * 64
    keep_all = account(cfg, {"stages": [{"layer": 1, "keep": 16, "scorer": "pio", "selector": "topk"}]}, 16, 10)
    assert keep_all.scorer_flops_true == 0 and not keep_all.stages[0].scored  # nothing removed: no scoring


def test_qwen_windows_match_transformers():
    for rows, cols in [(72, 72), (8, 6), (20, 14), (16, 16), (2, 2)]:
        _, cu = get_vision_window_index(
            torch.tensor([[1, rows, cols]]), spatial_merge_size=2, window_size=112, patch_size=14
        )
        assert qwen_window_lengths(rows, cols, 2, 8) == (cu[1:] - cu[:-1]).tolist()
    assert qwen_window_lengths(72, 72, 2, 8) == [64] * 81


# ---------------------------------------------------------------------------------------------
# real configs: FlopCounterMode on the meta device


@pytest.mark.parametrize("name", REAL)
def test_real_configs_against_flop_counter(name):
    config = real_config(name)
    acc = account(config, "pio_64", n_visual=model_config(name)["n_visual"], n_text=60)
    assert len(set(acc.per_layer_tokens)) == 4  # the layers really differ in length
    counted = count_with_flop_counter(config, acc.per_layer_tokens, n_visual=acc.n_visual)
    assert rel(acc.llm_flops_true, counted["decoder_layers"]) < 1e-3
    assert rel(acc.lm_head_flops_true, counted["lm_head"]) < 1e-3
    assert rel(acc.vision_flops_true, counted["vision_tower"]) < 1e-3
    assert rel(acc.projector_flops_true, counted["projector"]) < 1e-3


def test_real_config_contents():
    llava = real_config("llava_1_5_7b")
    assert llava.model_type == "llava" and llava.vision_feature_layer == -2
    assert llava.vision_config.image_size == 336 and llava.vision_config.num_hidden_layers == 24
    d = text_dims(llava)
    assert (d.n_layers, d.hidden, d.intermediate, d.n_kv_heads) == (32, 4096, 11008, 32)
    nxt = real_config("llava_next_7b")
    assert nxt.model_type == "llava_next" and [672, 672] in [list(p) for p in nxt.image_grid_pinpoints]
    qwen = real_config("qwen2_5_vl_7b")
    q = text_dims(qwen)
    assert (q.n_layers, q.hidden, q.intermediate, q.n_heads, q.n_kv_heads, q.head_dim) == (28, 3584, 18944, 28, 4, 128)
    vc = qwen.vision_config
    assert (vc.depth, vc.hidden_size, vc.out_hidden_size, vc.window_size) == (32, 1280, 3584, 112)
    assert list(vc.fullatt_block_indexes) == [7, 15, 23, 31]
    # text_layers builds a shallower decoder; arch must match model_type
    spec = dict(model_config("qwen2_5_vl_7b"), text_layers=3)
    assert hf_config(spec).get_text_config().num_hidden_layers == 3
    with pytest.raises(ValueError, match="does not match"):
        hf_config(dict(model_config("llava_1_5_7b"), arch="qwen2_5_vl"))
    with pytest.raises(PlanError, match="known model configs"):
        model_config("llava_13b")
    tiny = hf_config(model_config("tiny_llava"))  # kind tiny: the config of tokenreduce.testing.tiny
    assert (
        tiny.model_type == "llava"
        and tiny.get_text_config().num_hidden_layers == model_config("tiny_llava")["text_layers"]
    )


# ---------------------------------------------------------------------------------------------
# the paper's figures


def test_paper_vanilla_figures():
    llava = account("llava_1_5_7b")
    assert (llava.n_visual, llava.n_text) == (576, 60)
    assert math.floor(llava.flops_paper / 1e10) / 100 == 2.98  # 2.986 T (the README truncates)
    assert round(llava.llm_flops_true / 1e12, 2) == 8.45  # 636-token LLM prefill, 2 per MAC
    assert llava.llm_flops_true == 32 * 2 * (4 * 636 * 4096**2 + 2 * 636**2 * 4096 + 3 * 636 * 4096 * 11008)
    assert llava.kv_bytes == 318 * 2**20  # 636 tokens x 0.5 MiB
    nxt = account("llava_next_7b")
    assert nxt.n_visual == 2880 and round(nxt.flops_paper / 1e12, 2) == 16.67
    pio = account("llava_1_5_7b", "pio_64")
    assert pio.layer_average == 64.0
    assert round(pio.kv_bytes / 2**20) == 62  # README: 62 MB
    assert any("'nms'" in u for u in pio.uncounted)  # data-dependent selector work is listed, not hidden
    json.dumps(pio.to_dict())
    compiled = tokenreduce.build_plan("pio_64", n_layers=32)
    assert account("llava_1_5_7b", compiled).flops_true == account("llava_1_5_7b", "pio_64").flops_true
    with pytest.raises(PlanError, match="built for 32 decoder layers"):
        account(tiny_llava_config(), compiled)


def test_pio_64_paper_column_is_the_papers_figure():
    """PIO-FVLM's README: PIO at 11.1% on LLaVA-1.5-7B costs 0.45 T (6.62x against 2.98 T) in the
    paper column, which counts each probe by its forward; the true column keeps the backward."""
    vanilla = account("llava_1_5_7b")
    pio = account("llava_1_5_7b", "pio_64")
    assert pio.probe_backward_factor == PAPER_PROBE_BACKWARD_FACTOR == 0.0
    assert 0.44e12 <= pio.flops_paper <= 0.45e12
    assert round(pio.flops_paper / 1e12, 3) == 0.442
    assert 6.6 <= pio.ratios(vanilla)["flops_paper"] <= 6.8  # 2.986 / 0.442 = 6.76
    dims = text_dims(real_config("llava_1_5_7b"))
    probes = [st for st in pio.stages if st.scorer == "pio"]
    assert len(probes) == 3 and all(st.scored for st in probes)
    # paper: the reduced layers + one layer forward f(N_before) per probe, nothing for the backward
    forwards = sum(layer_flops_paper(st.visual_before, dims.hidden, dims.intermediate) for st in probes)
    assert pio.scorer_flops_paper == forwards
    assert pio.flops_paper == pio.llm_flops_paper + forwards
    # true: each probe's forward and input-gradient backward, as they run
    true_parts = [pio_probe_flops(st.tokens_before, 4, dims, "fast") for st in probes]
    assert all(bwd > 0 for _, bwd in true_parts)
    assert pio.scorer_flops_true == sum(fwd + bwd for fwd, bwd in true_parts)
    assert pio.scorer_flops_true > sum(fwd for fwd, _ in true_parts)
    assert (
        pio.flops_true
        == (pio.llm_flops_true + pio.lm_head_flops_true + pio.vision_flops_true + pio.projector_flops_true)
        + pio.scorer_flops_true
        + pio.selector_flops_true
    )
    assert "forward f(N_before) only, the paper's rule" in pio.to_dict()["conventions"]["flops_paper"]
    # the official profiler's backward_gamma = 2 stays reachable; it moves the paper column only
    gamma = account("llava_1_5_7b", "pio_64", probe_backward_factor=2)
    assert round(gamma.flops_paper / 1e12, 3) == 0.675
    assert gamma.flops_paper == pio.flops_paper + 2 * forwards
    assert gamma.flops_true == pio.flops_true
    assert "2 x f(N_before) for the backward" in gamma.to_dict()["conventions"]["flops_paper"]
    # a plan without a gradient probe is the same under both rules
    assert account("llava_1_5_7b", "fastv_64", probe_backward_factor=2).flops_paper == (
        account("llava_1_5_7b", "fastv_64").flops_paper
    )


def test_reference_pio_costs_less_than_vanilla_in_the_paper_column():
    """On the 4-layer reference model the probes are a large share, yet under the paper's rule
    PIO at 11.1% stays below vanilla (it did not with the backward charged as 2 forwards)."""
    vanilla = account("easyvqa_llava")
    pio = account("easyvqa_llava", "ref_pio_11")
    assert vanilla.n_visual == 144  # the config's image_seq_length (the model YAML leaves n_visual null)
    assert pio.flops_paper < vanilla.flops_paper
    assert account("easyvqa_llava", "ref_pio_11", probe_backward_factor=2).flops_paper > vanilla.flops_paper


def test_flops_command_paper_rule_and_profiler_option(tmp_path, capsys):
    from tokenreduce.cli import main

    argv = ["flops", "model=llava_1_5_7b", "plans=[pio_64]", "flops.include_vision=false"]
    results = {}
    for factor in (0, 2):
        out = tmp_path / f"gamma{factor}"
        assert main([*argv, f"flops.probe_backward_factor={factor}", f"out_dir={out}"]) == 0
        printed = capsys.readouterr().out
        results[factor] = json.loads((out / "results.json").read_text())["accounting"]["pio_64"]
        assert ("forward f(N_before) only, the paper's rule" in printed) == (factor == 0)
        assert ("2 x f(N_before) for the backward" in printed) == (factor == 2)
    assert round(results[0]["flops_paper"] / 1e12, 3) == 0.442
    assert round(results[2]["flops_paper"] / 1e12, 3) == 0.675
    assert results[0]["flops_true"] == results[2]["flops_true"]
    for bad in ("-1", "nan", "inf", "abc"):
        assert main([*argv, f"flops.probe_backward_factor={bad}", f"out_dir={tmp_path / 'bad'}"]) != 0
        err = capsys.readouterr().err
        assert "flops.probe_backward_factor" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# a real tiny prefill: FlopCounterMode around the model, scorers included; KV bytes


PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
PLANS = {
    "pio_fast": {
        "positions": "renumber",
        "stages": [
            {"layer": 1, "keep": 8, "scorer": {"name": "pio"}, "selector": "topk"},
            {"layer": 3, "keep": 3, "scorer": {"name": "pio", "loss_positions": 2}, "selector": "topk"},
        ],
    },
    "pio_exact_prev_layer": {
        "stages": [
            {"layer": 2, "keep": 6, "scorer": {"name": "pio", "probe": "exact", "layer_offset": -1}, "selector": "topk"}
        ]
    },
    "fastv": {"stages": [{"layer": 2, "keep": 5, "scorer": "fastv", "selector": "topk"}]},
    "pdrop_dart_divprune": {
        "stages": [
            {"layer": 1, "keep": 12, "scorer": "pdrop", "selector": "topk"},
            {"layer": 2, "keep": 9, "selector": "dart"},
            {"layer": 3, "keep": 4, "selector": "divprune"},
        ]
    },
}


@pytest.fixture(scope="module")
def tiny_eager():
    # eager attention: its products are plain matmuls, which FlopCounterMode counts on CPU
    return build_tiny("llava", attn_implementation="eager", text_layers=4, num_key_value_heads=2)


@pytest.mark.parametrize("name", list(PLANS))
def test_prefill_flops_with_scorers_match_flop_counter(tiny_eager, name):
    model, plan = tiny_eager, PLANS[name]
    known = {(c["kind"], c["name"]) for c in tokenreduce.list_components()}
    for st in plan["stages"]:
        for kind in ("scorer", "selector"):
            ref = st.get(kind)
            ref = ref["name"] if isinstance(ref, dict) else ref
            if ref is not None and (kind, ref) not in known:
                pytest.skip(f"{kind} {ref!r} is not registered")
    inputs = make_inputs("llava", [PROMPT])
    ids = inputs["input_ids"]
    n_visual = int((ids == model.config.image_token_id).sum())
    with torch.no_grad(), tokenreduce.apply(model, plan) as att:
        with flop_counter() as counter:
            model(**inputs, logits_to_keep=1)
        trace = att.trace
    from_plan = account(model.config, plan, n_visual=n_visual, n_text=ids.shape[1] - n_visual)
    from_trace = account(model.config, plan, trace=trace)
    assert from_plan.per_layer_tokens == from_trace.per_layer_tokens
    assert from_plan.scorer_flops_true > 0
    assert from_trace.flops_true == from_plan.flops_true
    assert rel(from_plan.flops_true, counter.get_total_flops()) < 1e-3
    assert from_plan.flops_true == counter.get_total_flops()  # in fact exact


def test_kv_bytes_equal_dynamic_cache():
    model = build_tiny("llava", text_layers=4)  # sdpa, fp32
    inputs = make_inputs("llava", [PROMPT])
    ids = inputs["input_ids"]
    n_visual = int((ids == model.config.image_token_id).sum())
    plan = {
        "stages": [
            {"layer": 1, "keep": 9, "scorer": "norm", "selector": "topk"},
            {"layer": 3, "keep": 2, "scorer": "norm", "selector": "topk"},
        ]
    }
    with torch.no_grad():
        vanilla = model(**inputs, use_cache=True).past_key_values
        with tokenreduce.apply(model, plan) as att:
            cut = model(**inputs, use_cache=True).past_key_values
            trace = att.trace
    acc0 = account(model.config, None, n_visual=n_visual, n_text=ids.shape[1] - n_visual, kv_dtype_bytes=4)
    assert acc0.kv_bytes == cache_bytes(vanilla)
    acc = account(model.config, plan, n_visual=n_visual, n_text=ids.shape[1] - n_visual, kv_dtype_bytes=4)
    assert cache_tokens(cut) == acc.per_layer_tokens and len(set(acc.per_layer_tokens)) == 3
    assert acc.kv_bytes == cache_bytes(cut)
    assert account(model.config, plan, trace=trace, kv_dtype_bytes=4).kv_bytes == cache_bytes(cut)
    assert kv_bytes(acc.per_layer_tokens, 64, 4) == acc.kv_bytes


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_refused_clearly():
    cfg = tiny_llava_config()
    with pytest.raises(PlanError, match="out of range"):
        account(cfg, {"stages": [{"layer": 5, "keep": 4, "selector": "random"}]})
    with pytest.raises(ValueError, match="n_visual"):
        account(cfg, None, n_visual=-1)
    with pytest.raises(ValueError, match="kv_dtype_bytes"):
        account(cfg, None, kv_dtype_bytes=3)
    with pytest.raises(ValueError, match="3-layer model"):
        account(cfg, None, trace=Trace(n_layers=2 + 1, original_visual=[16], final_index=[list(range(26))]))
    text_only = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UnsupportedModelError, match="include_vision=False"):
        account(text_only, None, n_visual=16, n_text=10)
    assert account(text_only, None, n_visual=16, n_text=10, include_vision=False).vision_flops_true == 0
    with pytest.raises(TypeError, match="PretrainedConfig"):
        account(42)
    for bad in (-1, -0.5, math.nan, math.inf, True, "2"):
        with pytest.raises(ValueError, match="probe_backward_factor must be a finite number >= 0"):
            account(
                cfg,
                {"stages": [{"layer": 1, "keep": 4, "scorer": "pio", "selector": "topk"}]},
                16,
                10,
                probe_backward_factor=bad,
            )
    trace_only = Trace(n_layers=2, original_visual=[16], final_index=[list(range(26))])
    assert account(cfg, None, trace=trace_only).per_layer_tokens == [26, 26]
