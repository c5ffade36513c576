"""The shipped easy-VQA reference models: plain ``from_pretrained`` folders, small, accurate, and
``generate()`` answers with the answer word and ``</s>`` also in left-padded batches."""

import json

import pytest
import torch
from safetensors import safe_open

from tokenreduce.reference import REFERENCE_MODELS, data, load_reference, reference_dir, reference_names
from tokenreduce.reference.evaluate import evaluate_generate

LLAVA = "easyvqa-llava"
QWEN = "easyvqa-qwen2_5_vl"
SHIPPED = [name for name in REFERENCE_MODELS if name in reference_names() and name.startswith("easyvqa-")]
_LOADED: dict = {}


def loaded(name: str):
    if name not in _LOADED:
        _LOADED[name] = load_reference(name)
    return _LOADED[name]


@pytest.fixture(scope="module")
def llava():
    return loaded(LLAVA)


def test_both_reference_models_are_shipped():
    assert SHIPPED == [LLAVA, QWEN]


def test_qwen_reference_loads_with_plain_from_pretrained_and_has_144_visual_tokens():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor

    path = reference_dir(QWEN)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path)
    assert model.config.text_config.num_hidden_layers >= 4
    image = data.load_split("test").image(0)
    inputs = processor(
        images=[image], text=[data.prompt("what color is the shape?", "qwen2_5_vl")], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]]  # 24x24 patches of 4 px, merged 2x2 -> 12x12


def test_llava_reference_is_shipped_and_loads_with_plain_from_pretrained():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert LLAVA in reference_names()
    path = reference_dir(LLAVA)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama"
    assert model.config.text_config.num_hidden_layers >= 4
    image = data.load_split("test").image(0)
    inputs = processor(images=[image], text=[data.prompt("what color is the shape?")], return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_visual >= 144


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folders_are_small_and_carry_a_model_card(name):
    path = reference_dir(name)
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    with safe_open(weights, "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    card = (path / "README.md").read_text()
    metrics = json.loads((path / "metrics.json").read_text())
    for needle in ("reference.train", "wall time", "test split", "seed"):  # the recorded training commands
        assert needle in card, needle
    assert f"{metrics['test_accuracy']:.4f}" in card
    assert metrics["test_questions"] == 9673


def test_unknown_reference_name_lists_the_shipped_ones():
    with pytest.raises(KeyError, match="easyvqa-llava"):
        reference_dir("easyvqa-nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_accuracy_on_the_fixed_ci_questions(name):
    model, processor = loaded(name)
    result = evaluate_generate(model, processor, "test", data.fixed_test_subset(200, seed=0), batch_size=100)
    assert result.n == 200
    assert result.accuracy >= 0.90, f"{name}: accuracy {result.accuracy:.3f} on the 200 CI questions"
    metrics = json.loads((reference_dir(name) / "metrics.json").read_text())
    assert result.accuracy == pytest.approx(metrics["ci_subset_accuracy"], abs=0.011)


def test_llava_reference_generates_answer_then_eos_in_left_padded_batches(llava):
    model, processor = llava
    split = data.load_split("test")
    index = [0, 1, 2, 3, 10, 11]  # questions of different lengths -> left padding
    images = [split.image(split.image_ids[i]) for i in index]
    prompts = [data.prompt(split.questions[i]) for i in index]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must contain left padding"
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    answers = set(data.answers())
    for k in range(len(index)):
        single = processor(images=[images[k]], text=[prompts[k]], return_tensors="pt")
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=3, do_sample=False)[0, single["input_ids"].shape[1] :]
        assert new[k, 1] == data.EOS_TOKEN_ID, processor.tokenizer.convert_ids_to_tokens(new[k])
        assert processor.tokenizer.decode(new[k, :1]) in answers
        assert torch.equal(new[k, :2], alone[:2])


def test_evaluate_generate_reads_the_scenes_task_and_refuses_an_unknown_one(llava):
    from tokenreduce.reference import scenes

    model, processor = (
        llava  # trained on easy-VQA: the scenes accuracy means nothing, the questions must be the scenes'
    )
    index = scenes.fixed_test_subset(4, 0)
    result = evaluate_generate(model, processor, "test", index, batch_size=2, task="scenes")
    assert result.indices == tuple(index) and result.n == 4
    answers = scenes.load_split("test").answers
    assert result.correct == tuple(p == data.normalize_answer(answers[i]) for p, i in zip(result.predictions, index))
    with pytest.raises(ValueError, match="task must be"):
        evaluate_generate(model, processor, "test", [0], task="gqa")  # type: ignore[arg-type]
