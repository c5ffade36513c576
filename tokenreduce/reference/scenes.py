"""Cluttered scenes: a generated visual-question task whose answers depend on the question.

Each image is a 3x3 grid of cells on a plain background, 3 to 6 of them holding an object (a
shape of one of 4 kinds, one of 6 colours, small or large, jittered inside its cell so that large
neighbours may overlap), plus 1 to 3 thin grey lines as clutter (never asked about). No two
objects of a scene share both colour and shape, so ``"the red circle"`` always names one object.
Every image comes with :data:`QUESTIONS_PER_IMAGE` questions of different types, about different
objects where the scene allows, so selecting visual tokens without reading the question keeps
the wrong object more often than on one-object data sets such as easy-VQA (question-aware
selection, e.g. SparseVLM, arXiv:2410.04417, against question-agnostic selection such as
VisionZip, arXiv:2412.04467, or DivPrune, arXiv:2503.02175).

Question types (:data:`QUESTION_TYPES`, stored per question in :attr:`ScenesSplit.types`):

- ``attribute_at``: ``"what color is the shape at the top left?"`` (colour, shape or size of the
  object in a named cell);
- ``attribute_of``: ``"what color is the triangle?"`` (only when one triangle is present),
  ``"what shape is the red shape?"`` (one red object), ``"what size is the red circle?"``;
- ``attribute_next_to``: ``"what color is the shape next to the red circle?"`` (the one object in
  a cell sharing a side with the red circle's cell);
- ``count``: ``"how many red shapes are there?"``, ``"how many circles are there?"`` (0 to 6);
- ``exists``: ``"is there a red circle?"``, ``"is there an orange square?"`` (yes/no, half each; an absent pair shares its colour
  or its shape with a present object, so the answer needs both bound to one object);
- ``relation``: ``"is the red circle left of the blue square?"`` (left of / right of / above /
  below, by grid cell; yes/no, half each).

Answers are single words or digits (:func:`answers`). The splits are fixed: image ``i`` of a split
is drawn from ``random.Random`` seeded with the split's base seed plus ``i``, and its questions
from the same generator, so the data are generated on the fly (no download, nothing cached on
disk) and identical on every machine. ``train`` holds 8,000 images and 48,000 questions, ``test``
1,000 images and 6,000 questions (:data:`SPLIT_SIZES`). Images are drawn at 4x and downsampled to
:data:`IMAGE_SIZE` (96 px: 24x24 patches of 4 px). They must not be flipped for augmentation:
left/right answers would change.

The API mirrors :mod:`tokenreduce.reference.data` (easy-VQA): :func:`load_split`,
:func:`answers`, :func:`vocabulary`, :func:`make_tokenizer`, :func:`train_val_split`,
:func:`fixed_test_subset`; prompts and targets are the same (:func:`tokenreduce.reference.data.prompt`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from tokenreduce.reference import data

__all__ = [
    "TASK",
    "SPLITS",
    "SPLIT_SIZES",
    "QUESTIONS_PER_IMAGE",
    "IMAGE_SIZE",
    "SCENE_COLORS",
    "SCENE_SHAPES",
    "SIZES",
    "CELL_NAMES",
    "QUESTION_TYPES",
    "SceneObject",
    "Scene",
    "Question",
    "ScenesSplit",
    "make_scene",
    "generate_split",
    "render",
    "make_questions",
    "load_split",
    "answers",
    "vocabulary",
    "make_tokenizer",
    "train_val_split",
    "fixed_test_subset",
    "accuracy_by_type",
]

#: The task's name (as the evaluation and the training script call it).
TASK = "scenes"
SPLITS = ("train", "test")
#: Images per split; every image has :data:`QUESTIONS_PER_IMAGE` questions.
SPLIT_SIZES = {"train": 8000, "test": 1000}
QUESTIONS_PER_IMAGE = 6
#: Side of the rendered images in pixels (24x24 patches of 4 px).
IMAGE_SIZE = 96
_SEED_BASE = {"train": 1_000_000, "test": 2_000_000}
_SUPERSAMPLE = 4

#: Colour names and their RGB values (each object jitters them by up to 12 per channel).
SCENE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 185),
    "orange": (240, 135, 30),
}
SCENE_SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
#: Cell (row, column) -> the words naming it in questions.
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
QUESTION_TYPES = ("attribute_at", "attribute_of", "attribute_next_to", "count", "exists", "relation")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
# object radius as a fraction of the image side, by size; centre jitter inside the cell.  A small
# object spans about 4 patches of 4 px, a large one about 6-7 (radii 0.045-0.06 / 0.095-0.12 at
# first: a from-scratch CLIP tower needed about twice the steps to tell their shapes apart,
# tools/reference/TRAINING.md).
_RADIUS = {"small": (0.075, 0.09), "large": (0.12, 0.145)}
_JITTER = 0.06
_BACKGROUND = (228, 228, 222)


@dataclass(frozen=True)
class SceneObject:
    """One object: kind, colour, size, grid cell, and where it is drawn.

    Attributes:
        shape, color, size: one of :data:`SCENE_SHAPES`, :data:`SCENE_COLORS`, :data:`SIZES`.
        row, col: its cell, 0..2 from the top and from the left.
        x, y, radius: centre and radius as fractions of the image side.
        rgb: the exact fill colour.
    """

    shape: str
    color: str
    size: str
    row: int
    col: int
    x: float
    y: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """``"red circle"``: unique within its scene."""
        return f"{self.color} {self.shape}"

    def box(self, image_size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
        """Bounding box ``(left, top, right, bottom)`` in pixels of an ``image_size`` image."""
        r = self.radius * image_size
        cx, cy = self.x * image_size, self.y * image_size
        return (
            max(0, int(cx - r)),
            max(0, int(cy - r)),
            min(image_size, int(cx + r) + 1),
            min(image_size, int(cy + r) + 1),
        )


@dataclass(frozen=True)
class Scene:
    """A scene: its objects in drawing order (later ones on top) and its clutter lines
    (``(x0, y0, x1, y1)`` as fractions of the side)."""

    objects: tuple[SceneObject, ...]
    clutter: tuple[tuple[float, float, float, float], ...]

    def at(self, row: int, col: int) -> int | None:
        """Index of the object in cell ``(row, col)``, or None."""
        return next((i for i, o in enumerate(self.objects) if (o.row, o.col) == (row, col)), None)

    def neighbours(self, index: int) -> list[int]:
        """Indices of the objects in the cells that share a side with object ``index``'s cell."""
        o = self.objects[index]
        cells = {(o.row - 1, o.col), (o.row + 1, o.col), (o.row, o.col - 1), (o.row, o.col + 1)}
        return [i for i, p in enumerate(self.objects) if (p.row, p.col) in cells]


@dataclass(frozen=True)
class Question:
    """A question about a scene: text, answer, type, and the objects its answer depends on
    (indices into :attr:`Scene.objects`)."""

    text: str
    answer: str
    type: str
    objects: tuple[int, ...]


def make_scene(rng: random.Random) -> Scene:
    """Draw a scene from ``rng``: 3 to 6 objects in distinct cells, no two with the same colour and
    shape, and 1 to 3 clutter lines."""
    n = rng.randint(3, 6)
    cells = rng.sample(sorted(CELL_NAMES), n)
    pairs = rng.sample([(c, s) for c in SCENE_COLORS for s in SCENE_SHAPES], n)
    objects = []
    for (row, col), (color, shape) in zip(cells, pairs):
        size = rng.choice(SIZES)
        radius = rng.uniform(*_RADIUS[size])
        x = (col + 0.5) / 3 + rng.uniform(-_JITTER, _JITTER)
        y = (row + 0.5) / 3 + rng.uniform(-_JITTER, _JITTER)
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in SCENE_COLORS[color])
        objects.append(SceneObject(shape, color, size, row, col, x, y, radius, rgb))  # type: ignore[arg-type]
    clutter = tuple((rng.random(), rng.random(), rng.random(), rng.random()) for _ in range(rng.randint(1, 3)))
    return Scene(tuple(objects), clutter)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an ``image_size`` x ``image_size`` RGB image (drawn at 4x, then downsampled)."""
    big = image_size * _SUPERSAMPLE
    im = Image.new("RGB", (big, big), _BACKGROUND)
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in scene.clutter:
        draw.line([(x0 * big, y0 * big), (x1 * big, y1 * big)], fill=(150, 150, 150), width=_SUPERSAMPLE)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        elif o.shape == "square":
            h = r * 0.85
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=o.rgb)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=o.rgb)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=o.rgb)
    return im.resize((image_size, image_size), Image.Resampling.BOX)


def _article(name: str) -> str:
    """``"a red circle"``, ``"an orange circle"``."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _candidates(scene: Scene, rng: random.Random) -> dict[str, list[Question]]:
    """Every question of each type that has a unique answer on ``scene``."""
    objs = scene.objects
    out: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    attrs = ("color", "shape", "size")
    for i, o in enumerate(objs):
        where = CELL_NAMES[(o.row, o.col)]
        for attr in attrs:
            out["attribute_at"].append(
                Question(f"what {attr} is the shape at the {where}?", getattr(o, attr), "attribute_at", (i,))
            )
        if sum(p.shape == o.shape for p in objs) == 1:
            out["attribute_of"].append(Question(f"what color is the {o.shape}?", o.color, "attribute_of", (i,)))
        if sum(p.color == o.color for p in objs) == 1:
            out["attribute_of"].append(Question(f"what shape is the {o.color} shape?", o.shape, "attribute_of", (i,)))
    for i, o in enumerate(objs):  # size by name only where colour and shape cannot be asked: 2 answers
        if not any(q.objects == (i,) for q in out["attribute_of"]):
            out["attribute_of"].append(Question(f"what size is the {o.name}?", o.size, "attribute_of", (i,)))
    for i, o in enumerate(objs):
        near = scene.neighbours(i)
        if len(near) == 1:
            n = objs[near[0]]
            for attr in ("color", "shape"):
                out["attribute_next_to"].append(
                    Question(
                        f"what {attr} is the shape next to the {o.name}?",
                        getattr(n, attr),
                        "attribute_next_to",
                        (near[0], i),
                    )
                )
    present_colors = sorted({o.color for o in objs})
    present_shapes = sorted({o.shape for o in objs})
    for color in present_colors + [rng.choice(list(SCENE_COLORS))]:  # mostly present, sometimes any (maybe 0)
        idx = tuple(i for i, o in enumerate(objs) if o.color == color)
        out["count"].append(Question(f"how many {color} shapes are there?", str(len(idx)), "count", idx))
    for shape in present_shapes + [rng.choice(SCENE_SHAPES)]:
        idx = tuple(i for i, o in enumerate(objs) if o.shape == shape)
        out["count"].append(Question(f"how many {_PLURAL[shape]} are there?", str(len(idx)), "count", idx))
    names = {o.name for o in objs}
    absent = sorted(
        f"{c} {s}"
        for c in SCENE_COLORS
        for s in SCENE_SHAPES
        if f"{c} {s}" not in names and (c in present_colors or s in present_shapes)
    )
    if absent:
        if rng.random() < 0.5:
            i = rng.randrange(len(objs))
            out["exists"].append(Question(f"is there {_article(objs[i].name)}?", "yes", "exists", (i,)))
        else:
            name = rng.choice(absent)
            related = tuple(i for i, o in enumerate(objs) if o.color in name.split() or o.shape in name.split())
            out["exists"].append(Question(f"is there {_article(name)}?", "no", "exists", related))
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for i, j in rng.sample(pairs, min(4, len(pairs))):  # a few random ordered pairs; their cells differ
        a, b = objs[i], objs[j]
        holds = [
            r
            for r, ok in (
                ("left of", a.col < b.col),
                ("right of", a.col > b.col),
                ("above", a.row < b.row),
                ("below", a.row > b.row),
            )
            if ok
        ]
        # "no" questions ask about an axis on which the two differ, so the opposite relation holds
        fails = [opposite[r] for r in holds]
        answer = "yes" if rng.random() < 0.5 else "no"
        rel = rng.choice(holds if answer == "yes" else fails)
        out["relation"].append(Question(f"is the {a.name} {rel} the {b.name}?", answer, "relation", (i, j)))
    return out


def make_questions(scene: Scene, rng: random.Random, k: int = QUESTIONS_PER_IMAGE) -> list[Question]:
    """``k`` distinct questions about ``scene``: the types in a random order (each once while there
    are more questions than types, then again), each question about objects not yet asked about
    where the scene allows."""
    cands = _candidates(scene, rng)
    order = list(QUESTION_TYPES)
    rng.shuffle(order)
    chosen: list[Question] = []
    asked: set[int] = set()
    texts: set[str] = set()
    t = 0
    while len(chosen) < k:
        typ = order[t % len(order)]
        t += 1
        pool = [q for q in cands[typ] if q.text not in texts]
        if not pool and t > len(order):  # this type has no questions left: take any
            pool = [q for typ_ in QUESTION_TYPES for q in cands[typ_] if q.text not in texts]
            if not pool:
                raise ValueError(f"scene has only {len(chosen)} distinct questions, {k} requested")
        if not pool:
            continue
        fresh = [q for q in pool if not set(q.objects[:1]) & asked] or pool
        if typ == "count":  # most colours and shapes occur once: draw the answer first, so "1" is not a prior
            answer = rng.choice(sorted({q.answer for q in fresh}))
            fresh = [q for q in fresh if q.answer == answer]
        q = rng.choice(fresh)
        chosen.append(q)
        texts.add(q.text)
        asked.update(q.objects[:1])
    return chosen


@dataclass(frozen=True)
class ScenesSplit:
    """One split of the scenes task: questions, answers, their types, and the scene each is about.

    Attributes:
        name: ``"train"`` or ``"test"``.
        questions: the question texts.
        answers: the answer of each question (one of :func:`answers`).
        image_ids: the image id of each question (an index into ``scenes``).
        types: the question type of each question (one of :data:`QUESTION_TYPES`).
        objects: the indices (into its scene's objects) of the objects each answer depends on.
        scenes: the scene of each image id.
    """

    name: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: tuple[int, ...]
    types: tuple[str, ...]
    objects: tuple[tuple[int, ...], ...]
    scenes: tuple[Scene, ...]

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def num_images(self) -> int:
        return len(self.scenes)

    def image(self, image_id: int, image_size: int = IMAGE_SIZE) -> Image.Image:
        """The image ``image_id`` as an RGB ``PIL.Image`` (rendered on each call)."""
        if not 0 <= image_id < self.num_images:
            raise KeyError(f"scenes {self.name} split has no image {image_id}; ids are 0..{self.num_images - 1}")
        return render(self.scenes[image_id], image_size)

    def images(self) -> list[Image.Image]:
        """All images of the split, in image-id order (index ``i`` is image id ``i``)."""
        return [self.image(i) for i in range(self.num_images)]


def generate_split(name: str, num_images: int, seed_base: int) -> ScenesSplit:
    """``num_images`` scenes with their questions, image ``i`` drawn from
    ``random.Random(seed_base + i)``: the fixed splits are ``seed_base`` 1,000,000 (``train``) and
    2,000,000 (``test``); a training recipe may draw extra scenes from other bases.

    Raises:
        ValueError: ``num_images`` < 1, or the seeds would reach into the test split's.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    test = _SEED_BASE["test"]
    if name != "test" and seed_base < test + SPLIT_SIZES["test"] and test < seed_base + num_images:
        raise ValueError(
            f"seeds {seed_base}..{seed_base + num_images - 1} overlap the test split's "
            f"({test}..{test + SPLIT_SIZES['test'] - 1})"
        )
    questions, answers_, image_ids, types, objects, scenes = [], [], [], [], [], []
    for img in range(num_images):
        rng = random.Random(seed_base + img)
        scene = make_scene(rng)
        scenes.append(scene)
        for q in make_questions(scene, rng):
            questions.append(q.text)
            answers_.append(q.answer)
            image_ids.append(img)
            types.append(q.type)
            objects.append(q.objects)
    return ScenesSplit(
        name=name,
        questions=tuple(questions),
        answers=tuple(answers_),
        image_ids=tuple(image_ids),
        types=tuple(types),
        objects=tuple(objects),
        scenes=tuple(scenes),
    )


@cache
def load_split(split: Literal["train", "test"]) -> ScenesSplit:
    """Generate a split (cached; a few seconds for ``train``).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown scenes split {split!r}; expected one of {SPLITS}")
    return generate_split(split, SPLIT_SIZES[split], _SEED_BASE[split])


def answers() -> tuple[str, ...]:
    """Every possible answer: colours, shapes, sizes, counts 0-6, yes, no."""
    return (*SCENE_COLORS, *SCENE_SHAPES, *SIZES, *(str(n) for n in range(7)), "yes", "no")


@cache
def vocabulary() -> list[str]:
    """The words of every question template and answer, lower-cased, sorted (about 60 words)."""
    words: set[str] = set(answers()) | {w.lower() for w in ("USER", ":", "ASSISTANT")}
    for name in CELL_NAMES.values():
        words.update(name.split())
    words.update(_PLURAL.values())
    templates = (
        "what color shape size is the shape at the ?",
        "what is the shape next to the ?",
        "how many shapes are there ?",
        "is there a an ?",
        "is the left of right of above below the ?",
    )
    for t in templates:
        words.update(t.split())
    return sorted(words)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the scenes task: :data:`tokenreduce.reference.data.SPECIAL_TOKENS`
    (ids 0..8) followed by :func:`vocabulary`; otherwise as
    :func:`tokenreduce.reference.data.make_tokenizer` (lower-cases, ``<s>`` prepended, left padding,
    every answer one token)."""
    return data.make_tokenizer(vocabulary())


def train_val_split(val_images: int = 500, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split the *train* questions into a training part and a validation part of ``val_images``
    whole images drawn with ``random.Random(seed)`` (the test split is never used for selection).

    Returns:
        ``(train_index, val_index)``: ascending question indices into ``load_split("train")``.
    """
    return data.hold_out_images(load_split("train"), val_images, seed)


def fixed_test_subset(n: int = 200, seed: int = 0) -> list[int]:
    """``n`` fixed test-question indices: the first ``n`` after ``random.Random(seed).shuffle`` of
    all test indices (the recipe of :func:`tokenreduce.reference.data.fixed_test_subset`)."""
    total = len(load_split("test"))
    if not 0 < n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:n]


def accuracy_by_type(
    split: ScenesSplit, indices: Sequence[int], correct: Sequence[bool]
) -> dict[str, dict[str, float | int]]:
    """Accuracy per question type: type -> ``{"accuracy", "n"}`` (types in :data:`QUESTION_TYPES`
    order; types without questions left out)."""
    if len(indices) != len(correct):
        raise ValueError(f"{len(indices)} indices but {len(correct)} correctness flags")
    tally: dict[str, list[int]] = {}
    for i, ok in zip(indices, correct):
        t = tally.setdefault(split.types[i], [0, 0])
        t[0] += int(bool(ok))
        t[1] += 1
    return {
        typ: {"accuracy": tally[typ][0] / tally[typ][1], "n": tally[typ][1]} for typ in QUESTION_TYPES if typ in tally
    }
