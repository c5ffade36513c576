"""The lmms-eval plugin model (``--model tokenreduce``), against the real lmms-eval package.

lmms-eval declares torchvision (no CPU wheel here), datasets, decord and dozens more as hard
dependencies, none of which its model interface needs. So the fixture installs the published
``lmms-eval`` wheel with ``pip install --no-deps --target`` into a temporary folder, together with
the two packages its model registry and base class import (``loguru``, ``pytz``), and puts the
folder on ``sys.path``. What runs is lmms-eval's own code: its registry finds the model through
the ``lmms_eval.models`` entry point of the installed tokenreduce distribution, validates that
the class is an ``lmms`` subclass, and ``create_from_arg_string`` builds it from a model_args
string, as ``python -m lmms_eval --model tokenreduce --model_args ...`` does. Requests are
lmms-eval ``Instance`` objects with ``task_dict`` filled the way its evaluator fills it.

Checked on tiny LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL checkpoints saved to folders: a batch of
ragged images gives what each request gives alone through ``tokenreduce.apply`` + ``generate()``
(the reference, written here); ``until`` stop strings; the trace file; ``loglikelihood`` against
an unreduced full-sequence forward and, under a plan, against ``generate()``'s own logits; bad
``model_args``.
"""

from __future__ import annotations

import json

import pytest
import torch

import tokenreduce
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.tasks import format_prompt
from tokenreduce.testing.tiny import make_image, save_tiny_checkpoint

QUESTIONS = ["what color is the shape?", "what shape is it?", "is there a circle?"]
SIZES = [(56, 56), (112, 56), (56, 112)]  # ragged: LLaVA-NeXT and Qwen2.5-VL get different token counts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        arch: save_tiny_checkpoint(root / arch, arch, text_layers=4) for arch in ("llava", "llava_next", "qwen2_5_vl")
    }


def make_model(lmms_eval, model_args: str, batch_size: int = 1):
    from lmms_eval.models import get_model

    cls = get_model("tokenreduce")
    return cls.create_from_arg_string(model_args, {"batch_size": batch_size, "max_batch_size": None, "device": None})


def requests(kind: str, gen_kwargs: dict, docs: int = 3, target=None):
    """lmms-eval Instances over a toy task ``toy`` (split ``test``) whose docs hold one image each."""
    from lmms_eval.api.instance import Instance

    out = []
    for i in range(docs):
        visual = lambda doc: [doc["image"]]  # noqa: E731
        if kind == "generate_until":
            args = (QUESTIONS[i], dict(gen_kwargs), visual, i, "toy", "test")
        else:
            args = (QUESTIONS[i], target, visual, i, "toy", "test")
        out.append(
            Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})
        )
    return out


def toy_docs(docs: int = 3):
    return {"toy": {"test": [{"image": make_image(i, SIZES[i]), "answer": "red"} for i in range(docs)]}}


def reference_answers(
    lm, plan: str | None, max_new_tokens: int, docs: int = 3, per_layer: list | None = None
) -> list[str]:
    """Each request alone: the template, the processor, ``tokenreduce.apply`` and ``generate()``
    (the visual tokens per decoder layer of each go to ``per_layer``)."""
    loaded = lm.loaded
    template = loaded.prompt_template()
    answers = []
    for i in range(docs):
        inputs = loaded.processor_inputs([format_prompt(template, QUESTIONS[i])], [make_image(i, SIZES[i])])
        with torch.no_grad():
            if plan is None:
                out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                with tokenreduce.apply(loaded.model, plan) as att:
                    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                if per_layer is not None:
                    per_layer.append(att.trace.visual_per_layer(0))
        answers.append(
            loaded.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def test_lmms_eval_finds_the_model_through_its_entry_point(lmms_eval):
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from tokenreduce.integrations.lmms_eval_plugin import TokenReduceLMM

    assert "tokenreduce" in MODEL_REGISTRY_V2.list_model_names()
    assert get_model("tokenreduce") is TokenReduceLMM
    assert issubclass(TokenReduceLMM, lmms_eval.api.model.lmms)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_5_vl"])
def test_batched_generate_until_equals_each_request_alone(lmms_eval, checkpoints, tmp_path, arch):
    trace_file = tmp_path / "trace.jsonl"
    lm = make_model(lmms_eval, f"pretrained={checkpoints[arch]},plan=random_50,trace_file={trace_file}", batch_size=2)
    lm.task_dict = toy_docs()
    got = lm.generate_until(requests("generate_until", {"max_new_tokens": 4, "until": []}))
    per_layer: list = []
    assert got == reference_answers(lm, "random_50", 4, per_layer=per_layer)
    records = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert [r["doc_id"] for r in records] == [0, 1, 2] and {r["plan"] for r in records} == {"random_50"}
    assert [r["visual_per_layer"] for r in records] == per_layer  # each sample budgeted on its own count
    for counts in per_layer:  # random_50: half of the visual tokens from layer 2 on
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[0] // 2
    if arch != "llava":
        assert len({c[0] for c in per_layer}) > 1  # the batch really was ragged


def test_unreduced_model_and_stop_strings(lmms_eval, checkpoints):
    lm = make_model(lmms_eval, f"pretrained={checkpoints['llava']}", batch_size=3)
    lm.task_dict = toy_docs()
    full = lm.generate_until(requests("generate_until", {"max_new_tokens": 5}))
    assert full == reference_answers(lm, None, 5)
    word = full[0].split()[1] if len(full[0].split()) > 1 else None
    if word is not None:  # cut at the first occurrence of the stop string
        cut = lm.generate_until(requests("generate_until", {"max_new_tokens": 5, "until": [word]}))
        assert cut[0] == full[0][: full[0].find(word)]


def test_loglikelihood_unreduced_equals_a_full_sequence_forward(lmms_eval, checkpoints):
    lm = make_model(lmms_eval, f"pretrained={checkpoints['qwen2_5_vl']}")
    lm.task_dict = toy_docs()
    ((logprob, greedy),) = lm.loglikelihood(requests("loglikelihood", {}, docs=1, target="red circle"))
    loaded = lm.loaded
    prompt = format_prompt(loaded.prompt_template(), QUESTIONS[0])
    inputs = loaded.processor_inputs([prompt], [make_image(0, SIZES[0])])
    cont = loaded.processor.tokenizer("red circle", add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = dict(
        inputs,
        input_ids=torch.cat([inputs["input_ids"], cont], 1),
        attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + cont.shape[1], dtype=torch.long),
    )
    if "mm_token_type_ids" in inputs:  # Qwen2.5-VL: 0 = text for the continuation
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont)], 1)
    with torch.no_grad():
        logits = loaded.model(**full).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, cont[0].unsqueeze(-1)).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == cont[0]).all())


REFERENCE_LLAVA = "pkg:tokenreduce.reference/models/easyvqa-llava"


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_loglikelihood_under_a_plan_matches_generate(lmms_eval, checkpoints, arch):
    """Under a plan, loglikelihood of what generate() produced under the same plan is the sum of
    generate()'s own log-softmaxed logits, and its greedy flag says whether those were argmaxes.
    LLaVA: the shipped easy-VQA reference model (real answers) with PIO-FVLM; Qwen2.5-VL: a tiny
    random model with the random selector, its generation kept inside the tokenizer's vocabulary."""
    from transformers import LogitsProcessorList

    if arch == "llava":
        lm = make_model(
            lmms_eval, f"pretrained={REFERENCE_LLAVA},plan=ref_pio_11,prompt=USER: <image> {{question}} ASSISTANT:"
        )
    else:
        lm = make_model(lmms_eval, f"pretrained={checkpoints[arch]},plan=random_50")
    lm.task_dict = toy_docs(1)
    loaded, plan, tok = lm.loaded, lm.plan, lm.loaded.processor.tokenizer
    inputs = loaded.processor_inputs([format_prompt(loaded.prompt_template(), QUESTIONS[0])], [make_image(0, SIZES[0])])
    in_vocab = LogitsProcessorList(
        [lambda ids, scores: scores.masked_fill(torch.arange(scores.shape[-1]) >= len(tok), -1e9)]
    )
    with torch.no_grad(), tokenreduce.apply(loaded.model, plan):
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=1 if arch == "llava" else 3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            logits_processor=in_vocab,
        )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    text = tok.decode(new)
    assert tok(text, add_special_tokens=False)["input_ids"] == new.tolist()  # the continuation round-trips
    if arch == "llava":
        assert text in ("red", "green", "blue", "yellow", "gray", "black", "teal", "brown")  # a colour answer
    raw = [step[0].float() for step in out.logits]  # before the in-vocab mask
    expected = sum(float(torch.log_softmax(step, -1)[t]) for step, t in zip(raw, new))
    ((logprob, greedy),) = lm.loglikelihood(requests("loglikelihood", {}, docs=1, target=text))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(step.argmax()) == int(t) for step, t in zip(raw, new))
    if arch == "llava":
        assert greedy


def test_bad_model_args_name_the_key(lmms_eval, checkpoints):
    with pytest.raises(
        TokenReduceError, match="plam: unknown model_args key for --model tokenreduce; known keys: pretrained, plan,"
    ):
        make_model(lmms_eval, f"pretrained={checkpoints['llava']},plam=pio_64")
    with pytest.raises(TokenReduceError, match="pretrained: required"):
        make_model(lmms_eval, "plan=pio_64")
    with pytest.raises(TokenReduceError, match="batch_size 'auto' is not supported"):
        make_model(lmms_eval, f"pretrained={checkpoints['llava']}", batch_size="auto")
    with pytest.raises(tokenreduce.PlanError, match="unknown plan preset 'pio_65'; known presets: .*pio_64"):
        make_model(lmms_eval, f"pretrained={checkpoints['llava']},plan=pio_65")
    with pytest.raises(tokenreduce.PlanError, match="out of range: the model has 4 decoder layers"):
        make_model(lmms_eval, f"pretrained={checkpoints['llava']},plan=pio_64")  # cuts at layer 10


def test_video_visuals_and_beam_search_are_refused(lmms_eval, checkpoints):
    lm = make_model(lmms_eval, f"pretrained={checkpoints['llava']},plan=random_50")
    lm.task_dict = {"toy": {"test": [{"image": "clip.mp4"}]}}
    with pytest.raises(TokenReduceError, match="only images .* not video"):
        lm.generate_until(requests("generate_until", {"max_new_tokens": 2}, docs=1))
    lm.task_dict = toy_docs(1)
    with pytest.raises(TokenReduceError, match="num_beams > 1 is not supported"):
        lm.generate_until(requests("generate_until", {"max_new_tokens": 2, "num_beams": 3}, docs=1))
