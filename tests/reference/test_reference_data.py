"""easy-VQA loading, the word-level tokenizer, prompt encoding and the processors of the reference models."""

import pytest
import torch

from tokenreduce.reference import data
from tools.reference.build import ArchSettings, make_processor, num_visual_tokens
from tools.reference.train import _Encoded


def test_split_counts_match_the_documented_ones():
    train, test = data.load_split("train"), data.load_split("test")
    assert (train.num_images, len(train)) == (4000, 38575)
    assert (test.num_images, len(test)) == (1000, 9673)
    assert len(data.answers()) == 13
    assert set(train.answers) | set(test.answers) == set(data.answers())
    assert set(train.image_ids) == set(range(4000)) and set(test.image_ids) == set(range(1000))
    image = train.image(0)
    assert image.size == (64, 64) and image.mode == "RGB"


def test_unknown_split_and_image_raise_clearly():
    with pytest.raises(ValueError, match="unknown easy-VQA split 'val'"):
        data.load_split("val")
    with pytest.raises(KeyError, match="no image 4000"):
        data.load_split("train").image(4000)


def test_every_question_tokenizes_without_unk_and_every_answer_is_one_token():
    tok = data.make_tokenizer()
    for split in data.SPLITS:
        questions = sorted(set(data.load_split(split).questions))
        ids = tok(questions, add_special_tokens=False)["input_ids"]
        assert all(tok.unk_token_id not in row for row in ids)
    for answer in data.answers():
        assert len(tok(" " + answer, add_special_tokens=False)["input_ids"]) == 1
    assert [tok.convert_tokens_to_ids(t) for t in data.SPECIAL_TOKENS] == list(range(len(data.SPECIAL_TOKENS)))


def test_tokenizer_prepends_bos_pads_left_and_round_trips(tmp_path):
    tok = data.make_tokenizer()
    enc = tok(
        [data.prompt("what color is the shape?"), data.prompt("is there a red shape in the image?")], padding=True
    )
    assert tok.padding_side == "left"
    assert enc["input_ids"][0][0] == tok.pad_token_id and enc["input_ids"][1][0] == data.BOS_TOKEN_ID
    assert enc["input_ids"][0][enc["attention_mask"][0].index(1)] == data.BOS_TOKEN_ID
    assert tok.decode(tok(" blue</s>", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "blue"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    text = data.prompt("what shape does the image contain?") + data.target("circle")
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.padding_side == "left"


def test_prompt_takes_the_image_placeholder_from_the_architecture_spec():
    from tokenreduce.core.errors import UnsupportedModelError
    from tokenreduce.core.registry import get_registry

    assert data.prompt("what?") == "USER: <image> what? ASSISTANT:"
    for spec in get_registry().specs():
        assert data.prompt("what?", spec.model_type) == f"USER: {spec.prompt_images(1)} what? ASSISTANT:"
    assert data.prompt("what?", "qwen2_5_vl") == "USER: <|vision_start|><|image_pad|><|vision_end|> what? ASSISTANT:"
    with pytest.raises(UnsupportedModelError, match="no_such_arch"):
        data.prompt("what?", "no_such_arch")
    with pytest.deprecated_call():
        placeholders = data.IMAGE_PLACEHOLDER  # the former table, now read off the registry
    assert placeholders["llava"] == "<image>"
    assert placeholders["qwen2_5_vl"] == "<|vision_start|><|image_pad|><|vision_end|>"


def test_train_val_split_holds_out_whole_images_and_fixed_subset_is_stable():
    train_index, val_index = data.train_val_split(300, seed=0)
    split = data.load_split("train")
    assert len(train_index) + len(val_index) == len(split)
    assert {split.image_ids[i] for i in train_index}.isdisjoint({split.image_ids[i] for i in val_index})
    assert len({split.image_ids[i] for i in val_index}) == 300
    assert data.train_val_split(300, seed=0) == (train_index, val_index)
    subset = data.fixed_test_subset()
    assert len(subset) == 200 == len(set(subset))
    assert subset == data.fixed_test_subset(200, 0) == data.fixed_test_subset(300, 0)[:200]


def test_fixed_subset_is_the_eval_tasks_subset():
    tasks = pytest.importorskip("tokenreduce.measure.tasks")
    examples = tasks.load_task({"name": "easy_vqa", "split": "test", "n": 200, "seed": 0})
    assert [example.index for example in examples] == data.fixed_test_subset(200, seed=0)
    with pytest.raises(ValueError, match="n must be in"):
        data.fixed_test_subset(0)


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_pretokenized_training_ids_equal_the_processor_output(arch):
    """Training encodes prompts itself (image placeholder expanded once); it must match what the
    processor feeds the model at evaluation time."""
    settings = (
        ArchSettings(arch=arch, image_size=96, patch=8)
        if arch == "llava"
        else ArchSettings(arch=arch, image_size=64, patch=8, text_hidden=64, text_heads=4, text_kv_heads=2)
    )
    processor = make_processor(settings)
    split = data.load_split("test")
    index = [0, 5, 17]
    enc = _Encoded(split, index, processor.tokenizer, arch, num_visual_tokens(settings))
    images = [split.image(split.image_ids[i]) for i in index]
    prompts = [data.prompt(split.questions[i], arch) for i in index]
    processed = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    placeholder = data.IMAGE_TOKEN_ID if arch == "llava" else data.IMAGE_PAD_TOKEN_ID
    for k in range(len(index)):
        ids, mask = processed["input_ids"][k], processed["attention_mask"][k]
        row = enc.full_ids(k)
        assert torch.equal(row[:-2], ids[mask.bool()])
        assert int((row == placeholder).sum()) == num_visual_tokens(settings)
        assert row[-1] == data.EOS_TOKEN_ID
        assert processor.tokenizer.decode(row[-2:], skip_special_tokens=True) == split.answers[index[k]]


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_processor_round_trips_with_from_pretrained(arch, tmp_path):
    from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor

    settings = (
        ArchSettings(arch=arch)
        if arch == "llava"
        else ArchSettings(arch=arch, image_size=64, patch=8, text_hidden=64, text_heads=4, text_kv_heads=2)
    )
    processor = make_processor(settings)
    processor.save_pretrained(tmp_path)
    if arch == "llava":
        from transformers import AutoProcessor

        again = AutoProcessor.from_pretrained(tmp_path)
    else:
        again = ImageOnlyQwen2_5_VLProcessor.from_pretrained(tmp_path)
    assert type(again) is type(processor)
    split = data.load_split("test")
    images = [split.image(0), split.image(1)]
    prompts = [data.prompt(split.questions[0], arch), data.prompt("what color is the shape?", arch)]
    a = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    b = again(images=images, text=prompts, padding=True, return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    placeholder = data.IMAGE_TOKEN_ID if arch == "llava" else data.IMAGE_PAD_TOKEN_ID
    assert ((a["input_ids"] == placeholder).sum(1) == num_visual_tokens(settings)).all()


def test_image_tags_agree_with_every_question_of_the_image():
    """The shape/colour read off an image's questions must answer all its questions correctly."""
    tags = data.image_tags("test")
    split = data.load_split("test")
    assert len(tags) == 1000
    assert sum(shape is not None for shape, _ in tags.values()) > 900
    for q, a, img in zip(split.questions, split.answers, split.image_ids):
        shape, color = tags[img]
        words = data.split_words([q])[0]
        if a in data.SHAPES and shape is not None:
            assert a == shape, q
        if a in data.COLORS and color is not None:
            assert a == color, q
        if a in ("yes", "no") and shape is not None and color is not None:
            named = [w for w in words if w in data.SHAPES or w in data.COLORS]
            negated = "not" in words or words[:2] == ["is", "no"]
            present = all(w in (shape, color) for w in named)
            assert (a == "yes") == (present != negated), q
    train_index, val_index = data.train_val_split(300)
    held_out = {split_img for split_img in (data.load_split("train").image_ids[i] for i in val_index)}
    assert held_out.isdisjoint(data.image_tags("train", train_index))
