"""``tokenreduce.pipeline``: one call from a model and a plan to an answer.

The pipeline must answer exactly what the steps it stands for answer by hand: the same prompt
through the processor, ``model.generate()`` (greedy) under ``tokenreduce.apply(model, plan)``,
the new tokens decoded; without a plan, the plain ``generate()``.  Checked on the shipped
reference model (real answers, visual tokens that matter) and on a tiny Qwen2.5-VL; bad inputs
give errors that name the argument.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
import yaml

import tokenreduce
from tokenreduce.core.errors import PlanError, TokenReduceError
from tokenreduce.pipeline import Pipeline, PipelineResult
from tokenreduce.reference import data, load_reference, reference_dir

PLAN = "ref_pio_11"
N_NEW = 3


@pytest.fixture(scope="module")
def reference():
    model, processor = load_reference("easyvqa-llava")
    test = data.load_split("test")
    items = [(test.image(test.image_ids[i]), test.questions[i]) for i in (0, 1, 5)]
    return model, processor, items


@pytest.fixture(scope="module")
def ask(reference):
    model, processor, _ = reference
    return tokenreduce.pipeline(
        model, PLAN, processor=processor, prompt=data.prompt("{question}"), max_new_tokens=N_NEW
    )


def by_hand(model, processor, images, questions, plan=None):
    """Answers, generated ids and trace of the steps the pipeline stands for, written out."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=list(images), text=[data.prompt(q) for q in questions], padding=True, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if plan is None:
            out, trace = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False), None
        else:
            with tokenreduce.apply(model, plan) as att:
                out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
            trace = att.trace
    new = out[:, n_prompt:]
    answers = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return answers, new, trace


def test_answer_equals_generate_under_the_plan(reference, ask):
    model, processor, items = reference
    for image, question in items:
        answers, new, trace = by_hand(model, processor, [image], [question], PLAN)
        result = ask(image, question)
        assert isinstance(result, PipelineResult)
        assert result.answer == answers[0]
        assert result.tokens == new[0, : len(result.tokens)].tolist()
        assert result.prompt == data.prompt(question)
        assert result.trace is not None and result.visual_per_layer == trace.visual_per_layer(0)
        assert [s.kept for s in result.trace.stages] == [s.kept for s in trace.stages]
        assert result.visual_per_layer == [31, 19, 7, 7]  # ref_pio_11 on 144 visual tokens, 4 layers


def test_without_a_plan_it_equals_vanilla_generate(reference):
    model, processor, items = reference
    plain = tokenreduce.pipeline(model, processor=processor, prompt=data.prompt("{question}"), max_new_tokens=N_NEW)
    images, questions = zip(*items, strict=True)
    answers, new, _ = by_hand(model, processor, images, questions)
    for b, (image, question) in enumerate(items):
        result = plain(image, question)
        assert result.trace is None and result.visual_per_layer is None
        assert result.answer == answers[b]
    assert plain.plan is None


def test_a_batch_equals_the_batched_generate(reference, ask):
    model, processor, items = reference
    images, questions = zip(*items, strict=True)
    answers, _, trace = by_hand(model, processor, images, questions, PLAN)
    results = ask(list(images), list(questions), vanilla=True)
    assert [r.answer for r in results] == answers
    assert [r.sample for r in results] == [0, 1, 2]
    assert all(r.trace is results[0].trace for r in results)
    assert [r.visual_per_layer for r in results] == [trace.visual_per_layer(b) for b in range(3)]
    vanilla, _, _ = by_hand(model, processor, images, questions)
    assert [r.vanilla for r in results] == vanilla
    # one question about several images
    same = ask(list(images[:2]), questions[0])
    assert [r.prompt for r in same] == [data.prompt(questions[0])] * 2


def test_conf_name_folder_and_image_file(reference, ask, tmp_path):
    _, _, items = reference
    image, question = items[0]
    expected = ask(image, question).answer
    by_name = tokenreduce.pipeline("easyvqa_llava", PLAN, max_new_tokens=N_NEW)
    assert by_name.template == data.prompt("{question}")  # the model conf's prompt
    path = tmp_path / "shape.png"
    image.save(path)
    assert by_name(str(path), question).answer == by_name(path, question).answer == expected
    by_folder = tokenreduce.pipeline(reference_dir("easyvqa-llava"), PLAN, prompt=data.prompt("{question}"))
    assert by_folder(image, question, max_new_tokens=N_NEW).answer == expected
    # a model whose processor sits in its checkpoint folder: the processor is found
    found = tokenreduce.pipeline(by_folder.model, PLAN, max_new_tokens=N_NEW)
    assert type(found.processor) is type(by_folder.processor)
    assert found.template == tokenreduce.core.registry.get_registry().spec_for("llava").default_prompt()


def test_tiny_qwen_through_the_conf_name():
    ask = tokenreduce.pipeline("tiny_qwen2_5_vl", "random_50", max_new_tokens=4, text_layers=3)
    from tokenreduce.testing.tiny import make_image

    image = make_image(3, (100, 80))
    result = ask(image, "what color is the shape?", vanilla=True)
    inputs = ask.inputs([image], ["what color is the shape?"])
    with tokenreduce.apply(ask.model, "random_50") as att, torch.no_grad():
        out = ask.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert result.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()[: len(result.tokens)]
    assert result.visual_per_layer == att.trace.visual_per_layer(0)
    assert result.visual_per_layer[0] > result.visual_per_layer[-1]  # random_50 cut something
    with torch.no_grad():
        plain = ask.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (
        result.vanilla
        == ask.processor.batch_decode(plain[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    )


@pytest.mark.parametrize(
    ("image", "question", "kind", "names"),
    [
        (42, "q?", TypeError, "image must be a PIL image or the path"),
        ("/no/such/picture.png", "q?", ValueError, "image: no image file"),
        ("IMG", 7, TypeError, "question must be a str"),
        ("IMG", "   ", ValueError, "question must be a non-empty str"),
        (["IMG", "IMG"], ["a?"], ValueError, "question: got 1 questions for 2 images"),
        (["IMG", "IMG"], ["a?", ""], ValueError, "question[1] must be a non-empty str"),
        ([], "q?", ValueError, "image: an empty list"),
        (["IMG", 3.5], "q?", TypeError, "image[1] must be a PIL image"),
    ],
)
def test_bad_call_inputs_are_named(reference, ask, image, question, kind, names):
    real = reference[2][0][0]
    image = [real if x == "IMG" else x for x in image] if isinstance(image, list) else image
    image = real if image == "IMG" else image
    with pytest.raises(kind, match=names.replace("[", r"\[").replace("]", r"\]")):
        ask(image, question)


def test_bad_call_options_and_files(reference, ask, tmp_path):
    image, question = reference[2][0]
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1; got 0"):
        ask(image, question, max_new_tokens=0)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(ValueError, match="is not an image PIL can read"):
        ask(not_image, question)


def test_bad_construction_is_named(reference):
    model, processor, _ = reference
    with pytest.raises(TokenReduceError, match="unexpected options \\['dtype'\\]: with a loaded model"):
        tokenreduce.pipeline(model, PLAN, processor=processor, dtype="float32")
    with pytest.raises(TokenReduceError, match="processor: give it only with a loaded model"):
        tokenreduce.pipeline("easyvqa_llava", PLAN, processor=processor)
    with pytest.raises(TokenReduceError, match="unexpected options \\['colour'\\] for model conf 'easyvqa_llava'"):
        tokenreduce.pipeline("easyvqa_llava", colour="red")
    with pytest.raises(TokenReduceError, match="prompt must be a str with the placeholder"):
        tokenreduce.pipeline(model, processor=processor, prompt="USER: <image> ASSISTANT:")
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1; got True"):
        tokenreduce.pipeline(model, processor=processor, max_new_tokens=True)
    with pytest.raises(TokenReduceError, match="model_or_path must be a loaded Hugging Face VLM"):
        tokenreduce.pipeline(object(), processor=processor)
    with pytest.raises(PlanError):
        tokenreduce.pipeline(model, "no_such_preset", processor=processor)
    with pytest.raises(TokenReduceError, match="no registered architecture|not a folder|no such|does not exist"):
        tokenreduce.pipeline("/no/such/checkpoint")


def test_a_model_without_processor_or_folder_is_refused():
    from tokenreduce.testing.tiny import build_tiny

    model = build_tiny("llava", text_layers=2)
    with pytest.raises(TokenReduceError, match="processor: give the model's processor"):
        tokenreduce.pipeline(model, "random_50")


def test_repr_and_exports():
    assert tokenreduce.Pipeline is Pipeline and tokenreduce.PipelineResult is PipelineResult
    assert "pipeline" in tokenreduce.__all__


def test_citation_file_is_valid_and_has_the_package_version():
    """CITATION.cff (Citation File Format 1.2.0) parses, has the required keys, and carries the
    version of the package metadata (written once, in pyproject.toml)."""
    repo = Path(__file__).resolve().parents[1]
    cff = yaml.safe_load((repo / "CITATION.cff").read_text(encoding="utf-8"))
    for key in ("cff-version", "message", "title", "authors", "version", "license", "references"):
        assert key in cff, f"CITATION.cff has no {key!r}"
    assert cff["cff-version"] == "1.2.0"
    assert cff["authors"] == [{"name": "The tokenreduce developers"}]
    assert cff["license"] == "Apache-2.0"
    pyproject = (repo / "pyproject.toml").read_text(encoding="utf-8")
    version = tomllib.loads(pyproject)["project"]["version"]
    assert str(cff["version"]) == version, f"CITATION.cff version {cff['version']} != pyproject.toml {version}"
    assert any("2602.04657" in str(ref.get("identifiers")) for ref in cff["references"])
    changelog = (repo / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and f"## [{version}]" in changelog
