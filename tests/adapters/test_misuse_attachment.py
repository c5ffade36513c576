"""The attachment under misuse (issue 16, items 1, 2, 10, 12, 13): re-entering an attachment,
a second attachment on one model, the base model without its LM head, clamped keep counts and
right-padded generation.  Every refused call leaves the model computing bit-identical outputs."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import tokenreduce
from tokenreduce.core.errors import TokenReduceError, UnsupportedCallError, UnsupportedModelError
from tokenreduce.core.plan import ClampWarning
from tokenreduce.testing.tiny import build_tiny, make_inputs, make_processor

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
STEPS = 3
#: the tiny LLaVA has 16 visual tokens per image and 4 decoder layers
PRUNE = {"name": "prune4", "stages": [{"layer": 1, "keep": 4, "selector": "uniform"}]}


@pytest.fixture(scope="module")
def model():
    return build_tiny("llava")


@pytest.fixture(scope="module")
def inputs():
    return make_inputs("llava", [PROMPT, SHORT])


def our_hooks(model) -> int:
    return len(model._forward_pre_hooks) + sum(
        len(layer._forward_pre_hooks) for layer in [model.model.language_model, *model.model.language_model.layers]
    )


def generate(model, inputs, **kw):
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def vanilla(model, inputs):
    """What the unattached model computes (forward logits, generated ids and logits)."""
    with torch.no_grad():
        return model(**inputs).logits, *generate(model, inputs)


@pytest.fixture(scope="module")
def reduced(model, inputs):
    """What the model computes under PRUNE."""
    with torch.no_grad(), tokenreduce.apply(model, PRUNE):
        return model(**inputs).logits, *generate(model, inputs)


def assert_untouched(model, inputs, vanilla):
    """No hook left behind, no attribute added, and bit-identical outputs."""
    assert our_hooks(model) == 0
    assert not hasattr(model, "_tokenreduce_attachment")
    with torch.no_grad():
        logits = model(**inputs).logits
        seq, gen_logits = generate(model, inputs)
    assert torch.equal(logits, vanilla[0])
    assert torch.equal(seq, vanilla[1]) and torch.equal(gen_logits, vanilla[2])


def assert_reduced(model, inputs, reduced):
    with torch.no_grad():
        logits = model(**inputs).logits
        seq, gen_logits = generate(model, inputs)
    assert torch.equal(logits, reduced[0])
    assert torch.equal(seq, reduced[1]) and torch.equal(gen_logits, reduced[2])


def test_the_plan_changes_the_output(vanilla, reduced):
    """The checks below tell reduced from vanilla runs only if they differ."""
    assert not torch.equal(vanilla[2], reduced[2])


# -- item 1: re-entering an attachment ---------------------------------------------------------------
def test_a_second_with_block_reattaches_with_a_fresh_trace(model, inputs, vanilla, reduced):
    att = tokenreduce.apply(model, PRUNE)
    with att:
        assert_reduced(model, inputs, reduced)
    first = att.trace
    assert not att.attached and first.stages[0].visual_after == [4, 4]
    assert_untouched(model, inputs, vanilla)
    with att:  # used to run the full model silently, with the old trace
        assert att.attached
        assert att.trace is not first and att.trace.stages == []  # a fresh trace until the next prefill
        assert_reduced(model, inputs, reduced)
        assert att.trace.stages[0].visual_after == [4, 4]
    assert not att.attached
    assert_untouched(model, inputs, vanilla)


def test_an_explicitly_detached_attachment_reattaches_on_enter(model, inputs, vanilla, reduced):
    att = tokenreduce.apply(model, PRUNE)
    att.detach()
    assert not att.attached
    assert_untouched(model, inputs, vanilla)
    with att:
        assert_reduced(model, inputs, reduced)
    assert_untouched(model, inputs, vanilla)


def test_nested_with_blocks_detach_at_the_outermost_exit(model, inputs, vanilla, reduced):
    with tokenreduce.apply(model, PRUNE) as att:
        with att:
            with att as same:
                assert same is att
            assert att.attached  # used to detach here, and the rest of the outer block ran vanilla
            assert_reduced(model, inputs, reduced)
        assert att.attached
        assert_reduced(model, inputs, reduced)
    assert not att.attached
    assert_untouched(model, inputs, vanilla)


def test_detach_inside_a_with_block_ends_the_attachment(model, inputs, vanilla):
    with tokenreduce.apply(model, PRUNE) as att:
        with att:
            att.detach()
            assert not att.attached
        assert not att.attached  # an explicit detach() is final for the block
    assert_untouched(model, inputs, vanilla)


# -- item 2: one attachment per model ------------------------------------------------------------------
def test_a_second_apply_on_an_attached_model_is_refused(model, inputs, vanilla, reduced):
    with tokenreduce.apply(model, PRUNE) as att:
        hooks = our_hooks(model)
        with pytest.raises(TokenReduceError, match=r"already attached.*'prune4'.*detach it first"):
            tokenreduce.apply(model, "uniform_25")
        assert our_hooks(model) == hooks
        assert_reduced(model, inputs, reduced)  # the first attachment still works, untouched
    assert not att.attached
    assert_untouched(model, inputs, vanilla)
    with tokenreduce.apply(model, "uniform_25"):  # free again after the detach
        pass
    assert_untouched(model, inputs, vanilla)


def test_reentering_while_another_attachment_holds_the_model_is_refused(model, inputs, vanilla, reduced):
    first = tokenreduce.apply(model, "uniform_25")
    first.detach()
    with tokenreduce.apply(model, PRUNE):
        with pytest.raises(TokenReduceError, match=r"already attached.*'prune4'"):
            with first:
                pytest.fail("entered")
        assert not first.attached
        assert_reduced(model, inputs, reduced)
    assert_untouched(model, inputs, vanilla)


def test_two_threads_cannot_attach_to_one_model(model, inputs, vanilla):
    attached, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder():
        with tokenreduce.apply(model, PRUNE):
            attached.set()
            release.wait(30)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    try:
        assert attached.wait(30)
        try:
            tokenreduce.apply(model, "uniform_25")
        except TokenReduceError as exc:
            errors.append(exc)
    finally:
        release.set()
        thread.join(30)
    assert len(errors) == 1 and "already attached" in str(errors[0]) and "thread 'holder'" in str(errors[0])
    assert_untouched(model, inputs, vanilla)


def test_separate_models_attach_at_the_same_time(model, inputs, reduced):
    other = build_tiny("llava")  # same weights (same seed), another object
    with tokenreduce.apply(model, PRUNE), tokenreduce.apply(other, PRUNE):
        assert_reduced(other, inputs, reduced)
        assert_reduced(model, inputs, reduced)


# -- item 10: the base model without an LM head -----------------------------------------------------
@pytest.mark.parametrize(
    "kind, expected",
    [
        ("llava", "LlavaForConditionalGeneration"),
        ("llava_next", "LlavaNextForConditionalGeneration"),
        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ],
)
def test_the_base_model_is_refused_with_what_to_pass(kind, expected):
    full = build_tiny(kind)
    base = full.model
    batch = make_inputs(kind, [PROMPT])
    with torch.no_grad():
        before = full(**batch).logits
    with pytest.raises(UnsupportedModelError, match=rf"{type(base).__name__}.*pass the whole model.*{expected}"):
        tokenreduce.apply(base, "uniform_25")
    assert [m for m in full.modules() if m._forward_pre_hooks] == []
    with torch.no_grad():
        assert torch.equal(full(**batch).logits, before)
    with tokenreduce.apply(full, "uniform_25"):  # the whole model is what to pass
        pass


# -- item 12: clamped keep counts -------------------------------------------------------------------------
def run_plan(model, inputs, plan):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), tokenreduce.apply(model, plan) as att:
            generate(model, inputs)
            model(**inputs)  # a second prefill under the same attachment
    return att.trace, [w for w in caught if issubclass(w.category, ClampWarning)]


def test_a_count_above_the_visual_tokens_is_recorded_and_warned_once(model, inputs):
    plan = {"name": "big", "stages": [{"layer": 1, "keep": 100, "selector": "uniform"}]}
    trace, caught = run_plan(model, inputs, plan)
    st = trace.stages[0]
    assert st.requested == [100, 100] and st.visual_after == [16, 16]
    assert st.clamped == [0, 1] and trace.clamped() == [(0, 0), (0, 1)]
    assert len(caught) == 1  # once per plan, not per prefill
    message = str(caught[0].message)
    assert "plan 'big' stages.0" in message and "asks for 100" in message and "16" in message
    assert "docs/concepts.md" in message


def test_a_ratio_that_rounds_to_zero_keeps_one_token_and_warns(model, inputs):
    trace, caught = run_plan(model, inputs, {"stages": [{"layer": 1, "keep": {"ratio": 0.01}, "selector": "uniform"}]})
    st = trace.stages[0]
    assert st.requested == [0, 0] and st.visual_after == [1, 1] and st.clamped == [0, 1]
    assert len(caught) == 1 and "asks for 0" in str(caught[0].message)


def test_a_later_stage_asking_for_more_than_kept_is_recorded_and_warned(model, inputs):
    plan = {
        "stages": [
            {"layer": 1, "keep": 4, "selector": "uniform"},
            {"layer": 2, "keep": {"ratio": 0.5, "of": "original"}, "selector": "uniform"},
        ]
    }
    trace, caught = run_plan(model, inputs, plan)
    first, second = trace.stages
    assert first.requested == [4, 4] and first.clamped == []
    assert second.requested == [8, 8] and second.visual_after == [4, 4] and second.clamped == [0, 1]
    assert len(caught) == 1 and "stages.1" in str(caught[0].message)


def test_no_clamp_no_warning(model, inputs):
    trace, caught = run_plan(model, inputs, {"stages": [{"layer": 1, "keep": {"ratio": 1.0}, "selector": "uniform"}]})
    assert trace.stages[0].requested == [16, 16] and trace.stages[0].clamped == [] and trace.clamped() == []
    trace, caught2 = run_plan(model, inputs, PRUNE)
    assert trace.stages[0].requested == [4, 4] and caught == caught2 == []


def test_one_warning_per_compiled_plan_across_attachments(model, inputs):
    adapter, compiled = tokenreduce.compile_for(model, {"stages": [{"layer": 1, "keep": 99, "selector": "uniform"}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # what tokenreduce eval does: one attachment per batch
            with torch.no_grad(), adapter.attach(model, compiled):
                model(**inputs)
    assert len([w for w in caught if issubclass(w.category, ClampWarning)]) == 1


def test_run_writes_requested_and_clamps_into_results(tmp_path, capsys):
    import json

    from tokenreduce.cli import main

    out = tmp_path / "run"
    argv = ["run", "plan=demo", "plan.stages.0.keep=100", "model=tiny_llava", "model.text_layers=4"]
    assert main([*argv, "model.image_size=56", "run.max_new_tokens=2", f"out_dir={out}"]) == 0
    assert "note: stage 0 asked for 100 visual tokens and kept 16" in capsys.readouterr().out
    trace = json.loads((out / "results.json").read_text())["trace"]
    assert trace["stages"][0]["requested"] == [100] and trace["stages"][0]["clamped"] == [0]
    assert trace["clamped"] == {"stages": 1, "samples": 1}


# -- item 13: right padding in generate() ---------------------------------------------------------------
@pytest.fixture(scope="module")
def right_padded():
    processor = make_processor("llava")
    processor.tokenizer.padding_side = "right"
    batch = make_inputs("llava", [PROMPT, SHORT], processor=processor)
    assert batch["attention_mask"][1, -1] == 0  # padding at the end of the short prompt
    return batch


def test_right_padded_generate_is_refused_before_computing(model, inputs, right_padded, vanilla, reduced):
    with tokenreduce.apply(model, PRUNE) as att:
        with torch.no_grad():
            model(**inputs)
        trace = att.trace
        with pytest.raises(UnsupportedCallError, match=r"sample 1.*padding_side='left'"):
            generate(model, right_padded)
        assert att.trace is trace  # refused before the prefill started
        assert_reduced(model, inputs, reduced)  # the attachment still works after the refusal
    assert_untouched(model, inputs, vanilla)


def test_decoding_after_a_right_padded_forward_is_refused(model, inputs, right_padded, vanilla):
    with tokenreduce.apply(model, PRUNE), torch.no_grad():
        out = model(**right_padded, use_cache=True)  # a plain forward accepts right padding
        step = {
            "input_ids": out.logits[:, -1:].argmax(-1),
            "attention_mask": torch.cat([right_padded["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
            "past_key_values": out.past_key_values,
        }
        with pytest.raises(UnsupportedCallError, match="padding_side='left'"):
            model(**step)
    assert_untouched(model, inputs, vanilla)


def test_a_right_padded_forward_without_cache_matches_single_runs(model, right_padded):
    """Right padding stays allowed where vanilla handles it: a forward without decoding."""
    with torch.no_grad(), tokenreduce.apply(model, PRUNE) as att:
        batch = model(**right_padded).logits
        final = att.trace.final_index
        single = model(**make_inputs("llava", [SHORT], seed=1)).logits
    n = int(right_padded["attention_mask"][1].sum())
    assert single.shape[1] == len(final[1]) == n - (16 - 4) and final[1][-1] == n - 1
    # like every cut, the reduced sequence comes back left-padded (trace.final_index maps its rows)
    torch.testing.assert_close(batch[1, -single.shape[1] :], single[0], atol=1e-5, rtol=1e-5)
