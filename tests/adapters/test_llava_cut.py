"""The LLaVA cut against an independent hand-written decoder loop (tests/oracle.py), identity,
batching, detach and bad input, on tiny random-weight models."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_generate

import tokenreduce
from tokenreduce.testing.tiny import IMAGE_TOKEN_ID, build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
STEPS = 5


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_tiny("llava", attn_implementation=request.param)


def our_hooks(model) -> int:
    return len(model._forward_pre_hooks) + sum(
        len(layer._forward_pre_hooks) for layer in model.model.language_model.layers
    )


def generate(model, inputs, **kw):
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, S+T], [B, T, V]


def oracle_stages(trace, input_ids, policies):
    """Oracle stages from a trace: every non-visual position plus the kept visual ones."""
    text = torch.nonzero(input_ids[0] != IMAGE_TOKEN_ID).flatten().tolist()
    return [(st.layer, sorted(text + st.kept[0]), pol) for st, pol in zip(trace.stages, policies)]


# -- keep-all identity -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "plan",
    [
        "keep_all",
        {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]},
        {"positions": "renumber", "stages": [{"layer": 2, "keep": {"ratio": 1.0}, "selector": "uniform"}]},
    ],
)
def test_keep_all_is_identity(model, plan):
    inputs = make_inputs("llava", [PROMPT, SHORT])
    ref_seq, ref_logits = generate(model, inputs)
    ref_forward = model(**inputs).logits
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
        forward = model(**inputs).logits
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(forward, ref_forward)
    assert all(st.visual_after == st.visual_before for st in att.trace.stages)


# -- the oracle ------------------------------------------------------------------------------------
ORACLE_CASES = {
    "K0": [{"layer": 0, "keep": 6, "selector": {"name": "random", "seed": 1}}],
    "K2": [{"layer": 2, "keep": 5, "selector": {"name": "random", "seed": 2}}],
    "K1+K3": [
        {"layer": 1, "keep": 9, "selector": "uniform"},
        {"layer": 3, "keep": 4, "scorer": "norm", "selector": "topk"},
    ],
    "K0+K2+K3": [
        {"layer": 0, "keep": 12, "selector": {"name": "random", "seed": 3}},
        {"layer": 2, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 4}},
        {"layer": 3, "keep": {"ratio": 0.125, "of": "original"}, "scorer": "norm"},
    ],
}


@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_pruned_generate_equals_oracle(model, case, policy):
    inputs = make_inputs("llava", [PROMPT])
    plan = {"positions": policy, "stages": ORACLE_CASES[case]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    trace = att.trace
    n_vis = trace.original_visual[0]
    assert [st.visual_after[0] for st in trace.stages] == tokenreduce.build_plan(plan).plan.keep_counts(n_vis, 4)
    assert all(st.visual_after[0] < st.visual_before[0] for st in trace.stages)
    stages = oracle_stages(trace, inputs["input_ids"], [policy] * len(trace.stages))
    tokens, ref_logits = oracle_generate(model, inputs["input_ids"], inputs["pixel_values"], stages, STEPS)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


def test_mixed_position_policies_equal_oracle(model):
    inputs = make_inputs("llava", [PROMPT])
    plan = {
        "stages": [
            {"layer": 1, "keep": 10, "selector": {"name": "random", "seed": 5}, "positions": "renumber"},
            {"layer": 3, "keep": 5, "selector": {"name": "random", "seed": 6}, "positions": "keep"},
        ]
    }
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    stages = oracle_stages(att.trace, inputs["input_ids"], ["renumber", "keep"])
    tokens, ref_logits = oracle_generate(model, inputs["input_ids"], inputs["pixel_values"], stages, STEPS)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


def test_pruning_changes_the_output(model):
    """Guard against a cut that silently does nothing."""
    inputs = make_inputs("llava", [PROMPT])
    _, ref_logits = generate(model, inputs)
    with tokenreduce.apply(model, {"stages": [{"layer": 0, "keep": 2, "selector": "random"}]}):
        _, logits = generate(model, inputs)
    assert not torch.allclose(logits, ref_logits)


# -- batches with left padding ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("first_layer", [0, 2])
def test_padded_batch_equals_single_runs(model, policy, first_layer):
    plan = {
        "positions": policy,
        "stages": [
            {"layer": first_layer, "keep": 8, "selector": "uniform"},
            {"layer": 3, "keep": 3, "scorer": "norm", "selector": "topk"},
        ],
    }
    prompts = [PROMPT, SHORT]
    batch = make_inputs("llava", prompts)
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, batch)
        trace = att.trace
        singles = []
        for i, prompt in enumerate(prompts):
            single = make_inputs("llava", [prompt], seed=i)
            singles.append((single, generate(model, single), att.trace))
    width = batch["input_ids"].shape[1]
    for i, (single, (s_seq, s_logits), s_trace) in enumerate(singles):
        pad = width - single["input_ids"].shape[1]
        assert seq[i, width:].tolist() == s_seq[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[i], s_logits[0], atol=1e-5, rtol=1e-5)
        for st, s_st in zip(trace.stages, s_trace.stages):
            assert st.kept[i] == [p + pad for p in s_st.kept[0]]


def test_sampled_generate_runs_and_keep_all_matches(model):
    inputs = make_inputs("llava", [PROMPT, SHORT])
    torch.manual_seed(0)
    ref = model.generate(**inputs, max_new_tokens=STEPS, do_sample=True, top_k=5)
    with tokenreduce.apply(model, "keep_all"):
        torch.manual_seed(0)
        same = model.generate(**inputs, max_new_tokens=STEPS, do_sample=True, top_k=5)
    assert torch.equal(ref, same)
    with tokenreduce.apply(model, "uniform_25") as att:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=True, top_k=5)
    assert out.shape == ref.shape
    assert att.trace.stages[0].visual_after == [4, 4]


# -- detach ----------------------------------------------------------------------------------------
def test_detach_restores_bit_identical_outputs(model):
    inputs = make_inputs("llava", [PROMPT, SHORT])
    before = model(**inputs).logits
    hooks = our_hooks(model)
    with tokenreduce.apply(model, "demo") as att:
        assert our_hooks(model) > hooks
        model.generate(**inputs, max_new_tokens=2)
    assert not att.attached
    assert our_hooks(model) == hooks
    assert torch.equal(model(**inputs).logits, before)


def test_detach_on_exception(model):
    inputs = make_inputs("llava", [PROMPT])
    before = model(**inputs).logits
    hooks = our_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with tokenreduce.apply(model, "demo"):
            model(**inputs)
            raise RuntimeError("boom")
    assert our_hooks(model) == hooks
    assert torch.equal(model(**inputs).logits, before)


def test_trace_records_original_positions(model):
    inputs = make_inputs("llava", [PROMPT])
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == IMAGE_TOKEN_ID).flatten().tolist()
    with tokenreduce.apply(model, "demo") as att:
        out = model(**inputs)
    first, second = att.trace.stages
    assert (first.layer, second.layer) == (1, 3)
    assert set(first.kept[0]) <= set(visual) and set(second.kept[0]) <= set(first.kept[0])
    assert first.tokens_after[0] == ids.numel() - (len(visual) - len(first.kept[0]))
    assert out.logits.shape[1] == len(att.trace.final_index[0])
    assert att.trace.final_index[0][-1] == ids.numel() - 1


# -- bad input -------------------------------------------------------------------------------------
BAD_PLANS = {
    "unknown strategy": ({"stages": [{"layer": 1, "keep": 4, "selector": "nope"}]}, "known selectors"),
    "keep zero": ({"stages": [{"layer": 1, "keep": 0, "selector": "random"}]}, "stages.0.keep"),
    "cut beyond depth": ({"stages": [{"layer": 4, "keep": 4, "selector": "random"}]}, "0..3"),
    "layers not increasing": (
        {"stages": [{"layer": 2, "keep": 4, "selector": "random"}, {"layer": 2, "keep": 2, "selector": "random"}]},
        "strictly increasing",
    ),
    "unknown preset": ("no_such_preset", "known presets"),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_bad_plans_fail_before_touching_the_model(model, name):
    plan, message = BAD_PLANS[name]
    hooks = our_hooks(model)
    with pytest.raises(tokenreduce.PlanError, match=message):
        tokenreduce.apply(model, plan)
    assert our_hooks(model) == hooks


def test_model_type_without_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(tokenreduce.UnsupportedModelError, match="supported model types: llava"):
        tokenreduce.apply(llm, "demo")
    assert not llm._forward_pre_hooks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": "ids"}, "labels"),
        ({"output_hidden_states": True}, "output_hidden_states"),
        ({"output_attentions": True}, "output_attentions"),
    ],
)
def test_unsupported_forward_arguments_are_refused(model, kwargs, message):
    inputs = make_inputs("llava", [PROMPT])
    kwargs = {k: inputs["input_ids"] if v == "ids" else v for k, v in kwargs.items()}
    before = model(**inputs).logits
    with tokenreduce.apply(model, "demo"):
        with pytest.raises(tokenreduce.UnsupportedCallError, match=message):
            model(**inputs, **kwargs)
        model(**inputs)  # the attachment still works after a refused call
    assert torch.equal(model(**inputs).logits, before)


def test_prompt_without_image_passes_through(model):
    inputs = make_inputs("llava", [PROMPT])
    text_only = {"input_ids": inputs["input_ids"][:, -6:], "attention_mask": inputs["attention_mask"][:, -6:]}
    ref_seq, ref_logits = generate(model, text_only)
    with tokenreduce.apply(model, "demo") as att:
        seq, logits = generate(model, text_only)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert all(st.visual_before == [0] for st in att.trace.stages)
