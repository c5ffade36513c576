"""The LLaVA-NeXT and Qwen2.5-VL adapters against the hand-written decoder loop (tests/oracle.py):
identity, the oracle under both position policies, detach, ragged batches, several images in
one prompt, every strategy inside generate(), and bad input.  Tiny random-weight models, CPU."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_generate

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
TWO = "USER: <image> and <image> same shape? ASSISTANT:"
STEPS = 4
SIZES = [(100, 80), (60, 120), (56, 56)]  # (width, height): three different visual counts per kind

KINDS = ["llava_next", "qwen2_5_vl"]
BATCH_ATOL = 3e-5  # batch vs single runs: float accumulation order differs with padding


@pytest.fixture(
    scope="module", params=[(k, a) for k in KINDS for a in ("sdpa", "eager")], ids=lambda p: f"{p[0]}-{p[1]}"
)
def model(request):
    kind, attn = request.param
    m = build_tiny(kind, attn_implementation=attn)
    m.kind = kind
    return m


def media_mask(model, input_ids):
    cfg = model.config
    if model.kind == "qwen2_5_vl":
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
    return input_ids == cfg.image_token_id


def generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, S+T], [B, T, V]


def oracle_for(model, inputs, att, policies, steps=STEPS):
    """Run the oracle with the stages the attachment recorded: every non-candidate position
    plus the kept candidates."""
    ids = inputs["input_ids"]
    text = torch.nonzero(~att.candidate_mask[0]).flatten().tolist()
    stages = [(st.layer, sorted(set(text) | set(st.kept[0])), pol) for st, pol in zip(att.trace.stages, policies)]
    extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw") if k in inputs}
    return oracle_generate(
        model, ids, inputs["pixel_values"], stages, steps, image_sizes=inputs.get("image_sizes"), extra=extra or None
    )


def inputs_for(model, prompts=(PROMPT,), sizes=None, seed=0):
    sizes = sizes or SIZES[: sum(max(1, p.count("<image>")) for p in prompts)]
    return make_inputs(model.kind, list(prompts), image_sizes=sizes, seed=seed)


# -- keep-all identity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "plan",
    [
        "keep_all",
        {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]},
        {"positions": "renumber", "stages": [{"layer": 2, "keep": {"ratio": 1.0}, "selector": "uniform"}]},
    ],
    ids=["preset", "K0-random", "K2-renumber"],
)
def test_keep_all_is_identity(model, plan):
    inputs = inputs_for(model, [PROMPT, SHORT])  # two image sizes: a ragged batch
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
    "K0": [{"layer": 0, "keep": {"ratio": 0.4}, "selector": {"name": "random", "seed": 1}}],
    "K2": [{"layer": 2, "keep": {"ratio": 0.3}, "selector": {"name": "random", "seed": 2}}],
    "K1+K3": [
        {"layer": 1, "keep": {"ratio": 0.6}, "selector": "uniform"},
        {"layer": 3, "keep": {"ratio": 0.5}, "scorer": "norm", "selector": "topk"},
    ],
}


@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_pruned_generate_equals_oracle(model, case, policy):
    inputs = inputs_for(model)
    plan = {"positions": policy, "stages": ORACLE_CASES[case]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    trace = att.trace
    n_vis = trace.original_visual[0]
    assert n_vis == int(media_mask(model, inputs["input_ids"]).sum())
    assert [st.visual_after[0] for st in trace.stages] == tokenreduce.build_plan(plan).plan.keep_counts(n_vis, 4)
    tokens, ref_logits = oracle_for(model, inputs, att, [policy] * len(trace.stages))
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


def test_mixed_policies_equal_oracle(model):
    inputs = inputs_for(model)
    plan = {
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 5}, "positions": "renumber"},
            {"layer": 3, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 6}, "positions": "keep"},
        ]
    }
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    tokens, ref_logits = oracle_for(model, inputs, att, ["renumber", "keep"])
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


def test_pruning_changes_the_output(model):
    inputs = inputs_for(model)
    _, ref_logits = generate(model, inputs)
    with tokenreduce.apply(model, {"stages": [{"layer": 0, "keep": 2, "selector": "random"}]}):
        _, logits = generate(model, inputs)
    assert not torch.allclose(logits, ref_logits)


def test_detach_restores_bit_identical_outputs(model):
    inputs = inputs_for(model, [PROMPT, SHORT])
    ref_seq, ref_logits = generate(model, inputs)
    att = tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]})
    with att:
        generate(model, inputs)
    assert not att.attached
    seq, logits = generate(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert len(model._forward_pre_hooks) == 0
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.language_model.layers)
    assert len(model.model.language_model._forward_pre_hooks) == 0


# -- ragged batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("first_layer", [0, 2])
def test_ragged_batch_of_three_equals_single_runs(model, policy, first_layer):
    """Different image sizes -> different visual counts -> different keep counts per sample."""
    plan = {
        "positions": policy,
        "stages": [
            {"layer": first_layer, "keep": {"ratio": 0.5}, "selector": "uniform"},
            {"layer": 3, "keep": {"ratio": 0.25, "of": "original"}, "scorer": "norm", "selector": "topk"},
        ],
    }
    prompts = [PROMPT, SHORT, "USER: <image> is there a circle in the image? ASSISTANT:"]
    batch = inputs_for(model, prompts, SIZES)
    assert bool((batch["attention_mask"] == 0).any())  # left padding present
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, batch)
    counts = att.trace.stages[0].visual_before
    assert len(set(counts)) == 3, counts
    for i, prompt in enumerate(prompts):
        single = make_inputs(model.kind, [prompt], image_sizes=[SIZES[i]], seed=i)
        with tokenreduce.apply(model, plan) as att1:
            seq1, logits1 = generate(model, single)
        assert att1.trace.stages[-1].visual_after[0] == att.trace.stages[-1].visual_after[i]
        n = single["input_ids"].shape[1]
        assert seq[i, -STEPS:].tolist() == seq1[0, n:].tolist()
        # the unreduced tiny models themselves differ by up to ~1e-5 between a padded batch and
        # single runs (different matmul shapes); a wrong mask or position differs by >1e-2
        torch.testing.assert_close(logits[i], logits1[0], atol=BATCH_ATOL, rtol=0)


# -- several images in one prompt ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_two_images_in_one_prompt(model, policy):
    inputs = inputs_for(model, [TWO], SIZES[:2])
    per_image = [
        int(media_mask(model, make_inputs(model.kind, [PROMPT], image_sizes=[s])["input_ids"]).sum()) for s in SIZES[:2]
    ]
    plan = {"positions": policy, "stages": [{"layer": 1, "keep": {"ratio": 0.5}, "selector": "uniform"}]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
        grid = att.visual_grid()
    assert att.trace.original_visual == [sum(per_image)]
    panels = grid[0][att.candidate_mask[0]][:, 0]
    # one panel per image (Qwen) or two (LLaVA-NeXT: base + crops); the uniform selector keeps
    # tokens of both images
    assert panels.max().item() + 1 == (2 if model.kind == "qwen2_5_vl" else 4)
    kept_panels = set(grid[0][att.trace.stages[0].kept[0]][:, 0].tolist())
    assert len(kept_panels) >= 2
    tokens, ref_logits = oracle_for(model, inputs, att, [policy])
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


# -- strategies on every adapter ---------------------------------------------------------------------
STRATEGY_STAGES = {
    "pio+nms": {"scorer": {"name": "pio", "loss_positions": 4}, "selector": "nms"},
    "pio-exact": {"scorer": {"name": "pio", "probe": "exact", "layer_offset": -1}, "selector": "topk"},
    "fastv": {"scorer": "fastv", "selector": "topk"},
    "random": {"selector": "random"},
    "uniform": {"selector": "uniform"},
}


@pytest.mark.parametrize("name", list(STRATEGY_STAGES))
def test_every_strategy_runs_in_generate(model, name):
    inputs = inputs_for(model, [PROMPT, SHORT])
    plan = {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, **STRATEGY_STAGES[name]}]}
    with tokenreduce.apply(model, plan) as att:
        seq, _ = generate(model, inputs)
    st = att.trace.stages[0]
    assert st.visual_after == [tokenreduce.build_plan(plan).plan.keep_counts(n, 4)[0] for n in st.visual_before]
    assert st.visual_after != st.visual_before
    assert seq.shape[1] == inputs["input_ids"].shape[1] + STEPS


def test_pio_three_stages_in_generate_equals_oracle(model):
    inputs = inputs_for(model)
    pio = {"scorer": {"name": "pio", "loss_positions": 4}, "selector": "nms"}
    plan = {
        "positions": "renumber" if model.kind == "llava_next" else "keep",
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.6}, **pio},
            {"layer": 2, "keep": {"ratio": 0.5}, **pio},
            {"layer": 3, "keep": {"ratio": 0.5}, **pio},
        ],
    }
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    counts = [st.visual_after[0] for st in att.trace.stages]
    assert counts == tokenreduce.build_plan(plan).plan.keep_counts(att.trace.original_visual[0], 4)
    assert counts[0] > counts[1] > counts[2] >= 1
    tokens, ref_logits = oracle_for(model, inputs, att, [plan["positions"]] * 3)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


# -- bad input -------------------------------------------------------------------------------------------
def test_cut_layer_beyond_depth_is_refused(model):
    with pytest.raises(PlanError, match=r"stages\.0\.layer=4 is out of range: the model has 4 decoder layers"):
        tokenreduce.apply(model, {"stages": [{"layer": 4, "keep": 2, "selector": "random"}]})
    assert len(model._forward_pre_hooks) == 0


def _model_error(model, inputs):
    with pytest.raises(Exception) as info:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return info


def test_placeholder_mismatch_surfaces_the_transformers_error(model):
    inputs = inputs_for(model)
    ids = inputs["input_ids"].clone()
    where = torch.nonzero(media_mask(model, ids)[0]).flatten()
    ids[0, where[0]] = 9  # one placeholder fewer than image features
    bad = {**inputs, "input_ids": ids}
    plain = _model_error(model, bad)
    with tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 2, "selector": "uniform"}]}):
        attached = _model_error(model, bad)
    assert type(attached.value) is type(plain.value)
    assert str(attached.value) == str(plain.value)
    assert "tokenreduce" not in "".join(str(f.path) for f in attached.traceback[-1:])


def test_pixel_values_without_image_tokens(model):
    inputs = inputs_for(model)
    ids = inputs["input_ids"].clone()
    ids[media_mask(model, ids)] = 9
    bad = {**inputs, "input_ids": ids}
    plain = _model_error(model, bad)
    with tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 2, "selector": "uniform"}]}):
        attached = _model_error(model, bad)
    assert type(attached.value) is type(plain.value) and str(attached.value) == str(plain.value)
