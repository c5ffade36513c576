"""The generated cluttered-scene task (``tokenreduce.reference.scenes``): deterministic, fixed split
sizes, every question type present, every answer recomputed from the scene's objects."""

import random
import re
from collections import Counter

import pytest

from tokenreduce.reference import data, scenes


@pytest.fixture(scope="module")
def test_split():
    return scenes.load_split("test")


def _answer_from_scene(question: str, scene: scenes.Scene) -> str:
    """Answer ``question`` from the scene's objects, parsing the text independently of the generator."""
    objs = scene.objects
    by_name = {o.name: o for o in objs}
    cells = {name: cell for cell, name in scenes.CELL_NAMES.items()}
    if m := re.fullmatch(r"what (color|shape|size) is the shape at the (.+)\?", question):
        (o,) = [o for o in objs if (o.row, o.col) == cells[m[2]]]
        return getattr(o, m[1])
    if m := re.fullmatch(r"what (color|shape) is the shape next to the (\w+ \w+)\?", question):
        a = by_name[m[2]]
        (o,) = [o for o in objs if abs(o.row - a.row) + abs(o.col - a.col) == 1]
        return getattr(o, m[1])
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.color
    if m := re.fullmatch(r"what shape is the (\w+) shape\?", question):
        (o,) = [o for o in objs if o.color == m[1]]
        return o.shape
    if m := re.fullmatch(r"what size is the (\w+ \w+)\?", question):
        return by_name[m[1]].size
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"is there an? (\w+ \w+)\?", question):
        return "yes" if m[1] in by_name else "no"
    if m := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        a, b = by_name[m[1]], by_name[m[3]]
        holds = {
            "left of": a.col < b.col,
            "right of": a.col > b.col,
            "above": a.row < b.row,
            "below": a.row > b.row,
        }[m[2]]
        return "yes" if holds else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_generation_is_deterministic():
    a = scenes.generate_split("test", 30, 2_000_000)
    b = scenes.generate_split("test", 30, 2_000_000)
    assert a == b
    assert a.questions == scenes.load_split("test").questions[: len(a)]
    extra = scenes.generate_split("extra", 30, 3_000_000)
    assert extra.name == "extra" and extra.questions != a.questions
    assert a.image(3).tobytes() == b.image(3).tobytes()
    assert scenes.make_scene(random.Random(7)) == scenes.make_scene(random.Random(7))
    assert scenes.make_scene(random.Random(7)) != scenes.make_scene(random.Random(8))


def test_extra_scenes_never_reach_into_the_test_split():
    with pytest.raises(ValueError, match=r"seeds 1999990..2000009 overlap the test split's \(2000000..2000999\)"):
        scenes.generate_split("extra", 20, 1_999_990)
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        scenes.generate_split("extra", 0, 3_000_000)


def test_split_sizes_are_the_documented_ones(test_split):
    assert scenes.SPLIT_SIZES == {"train": 8000, "test": 1000}
    assert test_split.num_images == 1000 and len(test_split) == 6000
    assert Counter(test_split.image_ids) == {img: scenes.QUESTIONS_PER_IMAGE for img in range(1000)}
    assert len(scenes.generate_split("train", 10, 1_000_000)) == 10 * scenes.QUESTIONS_PER_IMAGE
    with pytest.raises(ValueError, match="unknown scenes split 'val'"):
        scenes.load_split("val")
    with pytest.raises(KeyError, match="no image 1000"):
        test_split.image(1000)


def test_every_answer_matches_the_scene(test_split):
    for q, a, img in zip(test_split.questions, test_split.answers, test_split.image_ids):
        assert _answer_from_scene(q, test_split.scenes[img]) == a, (img, q, a)
    assert set(test_split.answers) <= set(scenes.answers())


def test_question_types_are_all_present_and_yes_no_are_balanced(test_split):
    counts = Counter(test_split.types)
    assert set(counts) == set(scenes.QUESTION_TYPES)
    assert min(counts.values()) > 0.1 * len(test_split), counts
    for typ in ("exists", "relation"):
        yes_no = Counter(a for a, t in zip(test_split.answers, test_split.types) if t == typ)
        assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) < 0.1 * sum(yes_no.values())


def test_each_image_is_asked_about_several_objects(test_split):
    targets: dict[int, set[int]] = {}
    texts: dict[int, set[str]] = {}
    for img, objs, q in zip(test_split.image_ids, test_split.objects, test_split.questions):
        if objs:
            targets.setdefault(img, set()).add(objs[0])
        texts.setdefault(img, set()).add(q)
    assert all(len(t) >= 2 for t in targets.values())
    assert sum(len(t) for t in targets.values()) / len(targets) > 3
    assert all(len(t) == scenes.QUESTIONS_PER_IMAGE for t in texts.values())  # no repeated question


def test_scenes_follow_their_rules_and_render_their_objects(test_split):
    for scene in test_split.scenes[:200]:
        assert 3 <= len(scene.objects) <= 6
        assert len({o.name for o in scene.objects}) == len(scene.objects)
        assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    scene = test_split.scenes[0]
    big = scenes.render(scene, 384)
    top = scene.objects[-1]  # drawn last: nothing covers its centre
    pixel = big.getpixel((int(top.x * 384), int(top.y * 384)))
    assert max(abs(p - c) for p, c in zip(pixel, top.rgb)) <= 2
    assert test_split.image(0).size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_tokenizer_covers_every_question_and_answer(test_split):
    tok = scenes.make_tokenizer()
    assert len(tok) <= 64  # the reference models' vocab_size
    ids = tok([data.prompt(q) for q in test_split.questions[:600]])["input_ids"]
    assert not any(tok.unk_token_id in row for row in ids)
    for a in scenes.answers():
        assert len(tok(a, add_special_tokens=False)["input_ids"]) == 1, a
        assert tok.convert_tokens_to_ids(a) != tok.unk_token_id
    assert tok.convert_tokens_to_ids("<s>") == data.BOS_TOKEN_ID and tok.padding_side == "left"


def test_fixed_subsets_and_validation_split_are_stable_and_by_image():
    assert scenes.fixed_test_subset(5) == scenes.fixed_test_subset(5) == scenes.fixed_test_subset(200)[:5]
    assert len(set(scenes.fixed_test_subset(200))) == 200
    with pytest.raises(ValueError, match="n must be in"):
        scenes.fixed_test_subset(0)
    train_index, val_index = scenes.train_val_split(50, seed=0)
    split = scenes.load_split("train")
    assert len(val_index) == 50 * scenes.QUESTIONS_PER_IMAGE
    assert len(train_index) + len(val_index) == len(split)
    assert not {split.image_ids[i] for i in train_index} & {split.image_ids[i] for i in val_index}


def test_accuracy_by_type(test_split):
    index = [i for i, t in enumerate(test_split.types) if t in ("count", "exists")][:10]
    correct = [True] * 5 + [False] * 5
    out = scenes.accuracy_by_type(test_split, index, correct)
    assert set(out) <= {"count", "exists"} and sum(v["n"] for v in out.values()) == 10
    with pytest.raises(ValueError, match="correctness flags"):
        scenes.accuracy_by_type(test_split, index, correct[:3])
