"""The shipped scenes reference model (``scenes-llava``): a plain ``from_pretrained`` LLaVA folder
with 576 visual tokens and 8 decoder layers, small, with a model card, and as accurate under greedy
``generate()`` on 200 fixed test questions as its card says."""

import json

import pytest

from tokenreduce.reference import REFERENCE_MODELS, data, load_reference, reference_dir, reference_names, scenes
from tokenreduce.reference.evaluate import evaluate_generate

NAME = "scenes-llava"


@pytest.fixture(scope="module")
def metrics():
    return json.loads((reference_dir(NAME) / "metrics.json").read_text())


def test_the_scenes_model_is_shipped_with_576_visual_tokens_and_8_layers():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert NAME in REFERENCE_MODELS and NAME in reference_names()
    path = reference_dir(NAME)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.text_config.num_hidden_layers >= 8
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -2
    split = scenes.load_split("test")
    inputs = processor(images=[split.image(0)], text=[data.prompt(split.questions[0])], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576  # 24 x 24 patches, LLaVA-1.5


def test_the_folder_is_small_and_its_card_reports_accuracy_by_question_type(metrics):
    path = reference_dir(NAME)
    assert (path / "model.safetensors").stat().st_size <= 15 * 2**20
    assert metrics["visual_tokens"] == 576 and metrics["test_accuracy"] >= 0.90
    assert metrics["test_questions"] == len(scenes.load_split("test"))  # the whole test split
    assert set(metrics["test_accuracy_per_type"]) == set(scenes.QUESTION_TYPES)
    card = (path / "README.md").read_text()
    assert "Per question type" in card and f"**{metrics['test_accuracy']:.4f}**" in card
    for typ, v in metrics["test_accuracy_per_type"].items():
        assert f"| {typ} | {v['n']:,} | {v['accuracy']:.4f} |" in card


def test_greedy_answers_on_200_fixed_test_questions_match_the_card(metrics):
    model, processor = load_reference(NAME)
    subset = scenes.fixed_test_subset(200, seed=0)
    result = evaluate_generate(model, processor, "test", subset, batch_size=50, task="scenes")
    assert result.accuracy >= metrics["test_accuracy"] - 0.03, (result.accuracy, metrics["test_accuracy"])
    # the card's number for these 200 questions was measured by teacher forcing: greedy decoding of a
    # one-word answer returns the same argmax, up to float noise between batch layouts (1 question)
    assert abs(result.accuracy - metrics["ci_subset_accuracy"]) <= 0.0051, (
        result.accuracy,
        metrics["ci_subset_accuracy"],
    )
