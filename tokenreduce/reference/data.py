"""easy-VQA data for the reference models: splits, prompts, the word-level tokenizer, cached images.

easy-VQA (Victor Zhou, https://github.com/vzhou842/easy-VQA, the ``easy-vqa`` package): 64x64
images of one coloured shape, template questions, 13 one-word answers; ``train`` has 4,000
images and 38,575 questions, ``test`` 1,000 images and 9,673 questions. Model selection never
uses the test split (:func:`train_val_split`). Prompts read ``"USER: <image> {question} ASSISTANT:"``
and the target is ``" {answer}</s>"``. See docs/index.md for a worked example.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPLITS",
    "SPECIAL_TOKENS",
    "PAD_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "IMAGE_PAD_TOKEN_ID",
    "VIDEO_PAD_TOKEN_ID",
    "DEFAULT_IMAGE_PLACEHOLDER",
    "EasyVQASplit",
    "load_split",
    "answers",
    "vocabulary",
    "make_tokenizer",
    "prompt",
    "target",
    "normalize_answer",
    "train_val_split",
    "fixed_test_subset",
    "SHAPES",
    "COLORS",
    "image_tags",
]

SPLITS = ("train", "test")

# The project's local tokenizers share one special-token layout (ids 0-8): the tiny test models'
# tokenizer defines it; the reference tokenizer uses the same ids.
from tokenreduce.testing.tiny import (  # noqa: E402
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_PAD_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    VIDEO_PAD_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
)

#: The image placeholder of :func:`prompt` when no architecture is named (LLaVA's).
DEFAULT_IMAGE_PLACEHOLDER = "<image>"


def __getattr__(name: str):
    if name == "IMAGE_PLACEHOLDER":  # deprecated: ask the architecture's spec (image_placeholder)
        import warnings

        from tokenreduce.core.registry import get_registry

        warnings.warn(
            "tokenreduce.reference.data.IMAGE_PLACEHOLDER is deprecated: use "
            "get_registry().spec_for(model_type).prompt_images(1)",
            DeprecationWarning,
            stacklevel=2,
        )
        return {spec.model_type: spec.prompt_images(1) for spec in get_registry().specs()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PROMPT_WORDS = ("USER", ":", "ASSISTANT")

#: The shape and colour answers of easy-VQA.
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "gray", "black", "teal", "brown")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class EasyVQASplit:
    """One easy-VQA split: questions, answers and the image each question is about.

    Attributes:
        name: ``"train"`` or ``"test"``.
        questions: the question texts, e.g. ``"what color is the shape?"``.
        answers: the answer word of each question (one of :func:`answers`).
        image_ids: the image id of each question (an index into ``image_paths``).
        image_paths: image id -> path of its 64x64 PNG.
    """

    name: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: tuple[int, ...]
    image_paths: dict[int, str] = field(repr=False)

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def image(self, image_id: int) -> Image.Image:
        """The image ``image_id`` as a 64x64 ``PIL.Image`` in mode ``"RGB"``."""
        try:
            path = self.image_paths[image_id]
        except KeyError:
            raise KeyError(
                f"easy-VQA {self.name} split has no image {image_id}; ids are 0..{self.num_images - 1}"
            ) from None
        with Image.open(path) as im:
            return im.convert("RGB")

    def images(self) -> list[Image.Image]:
        """All images of the split, in image-id order (index ``i`` is image id ``i``)."""
        return [self.image(i) for i in range(self.num_images)]


@cache
def load_split(split: Literal["train", "test"]) -> EasyVQASplit:
    """Load an easy-VQA split from the installed ``easy-vqa`` package (cached).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        ImportError: the ``easy-vqa`` package is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; expected one of {SPLITS}")
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError("the reference models need the 'easy-vqa' package: pip install easy-vqa") from exc
    if split == "train":
        texts, answers_, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers_, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    if sorted(paths) != list(range(len(paths))):
        raise ValueError(f"easy-VQA {split} image ids are not 0..{len(paths) - 1}")
    return EasyVQASplit(
        name=split,
        questions=tuple(texts),
        answers=tuple(answers_),
        image_ids=tuple(int(i) for i in image_ids),
        image_paths=dict(paths),
    )


@cache
def answers() -> tuple[str, ...]:
    """The 13 easy-VQA answers, in the package's order."""
    import easy_vqa

    return tuple(easy_vqa.get_answers())


def normalize_answer(text: str) -> str:
    """Normalise a decoded answer for exact match: lower case, surrounding whitespace and a final
    ``"."`` removed."""
    return text.strip().lower().rstrip(".").strip()


def vocabulary() -> list[str]:
    """The words of every easy-VQA question and answer (both splits), lower-cased, sorted.

    Questions split into words and punctuation (``"shape?"`` -> ``"shape"``, ``"?"``).
    """
    words: set[str] = set()
    for split in SPLITS:
        data = load_split(split)
        for text in data.questions:
            words.update(_WORD_RE.findall(text.lower()))
    words.update(a.lower() for a in answers())
    words.update(w.lower() for w in _PROMPT_WORDS)
    return sorted(words)


def make_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """The reference models' word-level tokenizer (``words``: another task's word list, e.g. the
    scenes task's; default the easy-VQA :func:`vocabulary`).

    - vocabulary: :data:`SPECIAL_TOKENS` (ids 0..8) followed by the easy-VQA words of
      :func:`vocabulary` (about 35 words); anything else is ``<unk>`` (id 0);
    - lower-cases, splits on whitespace and punctuation; decoding joins words with spaces;
    - prepends ``<s>`` to every text (like LLaVA-1.5's Llama tokenizer); no ``</s>`` is appended;
    - ``padding_side="left"`` (batched generation).

    Every answer is a single token, so the model's target is exactly two tokens: the answer and
    ``</s>``. The tokenizer saves and loads with ``save_pretrained`` / ``from_pretrained``.
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # special tokens are matched before normalisation
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    words = vocabulary() if words is None else sorted(set(words))
    trainer = trainers.WordLevelTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(words), special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator([" ".join(words)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=list(SPECIAL_TOKENS[4:]),
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        if hf_tok.convert_tokens_to_ids(token) != i:  # pragma: no cover - guards the id constants
            raise RuntimeError(f"special token {token!r} got id {hf_tok.convert_tokens_to_ids(token)}, expected {i}")
    return hf_tok


def prompt(question: str, arch: str | None = None) -> str:
    """The prompt for ``question``: ``"USER: <image> {question} ASSISTANT:"``, with the image
    placeholder of architecture ``arch`` (a registered ``model_type``, e.g. the model's
    ``config.model_type``) when given.

    Raises:
        UnsupportedModelError: ``arch`` is not a registered architecture.
    """
    placeholder = DEFAULT_IMAGE_PLACEHOLDER
    if arch is not None:
        from tokenreduce.core.registry import get_registry

        placeholder = get_registry().spec_for(arch, what="an easy-VQA prompt").prompt_images(1)
    return f"USER: {placeholder} {question} ASSISTANT:"


def target(answer: str) -> str:
    """The training target after the prompt: ``" {answer}</s>"``."""
    return f" {answer}</s>"


def train_val_split(val_images: int = 300, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split the *train* questions into a training part and a held-out validation part, by image.

    The questions of ``val_images`` training images drawn with ``random.Random(seed)`` form the
    validation part (about 2,900 questions for 300 images), so validation measures accuracy on
    unseen images. The test split is never used for model selection.

    Returns:
        ``(train_index, val_index)``: ascending question indices into ``load_split("train")``.
    """
    return hold_out_images(load_split("train"), val_images, seed)


def hold_out_images(split, val_images: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train_index, val_index)`` of any split with ``num_images`` and ``image_ids`` (the easy-VQA
    and the scenes tasks): the questions of ``val_images`` whole images drawn with
    ``random.Random(seed)`` go to validation."""
    if not 0 <= val_images < split.num_images:
        raise ValueError(f"val_images must be in [0, {split.num_images}), got {val_images}")
    held_out = set(random.Random(seed).sample(range(split.num_images), val_images))
    train_index = [i for i, img in enumerate(split.image_ids) if img not in held_out]
    val_index = [i for i, img in enumerate(split.image_ids) if img in held_out]
    return train_index, val_index


def fixed_test_subset(n: int = 200, seed: int = 0) -> list[int]:
    """``n`` fixed test-question indices: the first ``n`` of ``range(9673)`` after
    ``random.Random(seed).shuffle`` (the same recipe and order as the ``easy_vqa`` eval task of
    :mod:`tokenreduce.measure.tasks`, so ``task.n=200 task.seed=0`` evaluates the same questions).

    The CI accuracy check of the shipped reference models uses ``fixed_test_subset(200, 0)``.
    """
    total = len(load_split("test"))
    if not 0 < n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:n]


def image_tags(
    split: Literal["train", "test"], question_index: Sequence[int] | None = None
) -> dict[int, tuple[str | None, str | None]]:
    """The shape and colour of each image, read off its questions and answers.

    easy-VQA questions follow 24 templates. ``"what color is the triangle?" -> "blue"`` tells both;
    a yes/no question about a shape or colour tells it when the answer says it is present
    (``"yes"`` to ``"is there a triangle?"``, ``"no"`` to ``"is there not a triangle?"`` or
    ``"is no triangle present?"``). Images whose questions never tell one of the two get ``None``
    for it.

    Args:
        split: ``"train"`` or ``"test"``.
        question_index: read only these questions (e.g. the training part of
            :func:`train_val_split`, so held-out images stay unseen); default all.

    Returns:
        image id -> ``(shape or None, colour or None)`` for every image with at least one question read.
    """
    data_ = load_split(split)
    index = range(len(data_)) if question_index is None else question_index
    tags: dict[int, list[str | None]] = {}
    for i in index:
        words = _WORD_RE.findall(data_.questions[i].lower())
        answer = data_.answers[i]
        tag = tags.setdefault(data_.image_ids[i], [None, None])
        if answer in SHAPES or answer in COLORS:  # what-questions: the answer and any named attribute
            named = [answer] + [w for w in words if w in SHAPES or w in COLORS]
        else:
            negated = "not" in words or words[:2] == ["is", "no"]
            present = (answer == "yes") != negated
            named = [w for w in words if w in SHAPES or w in COLORS] if present else []
        for w in named:
            tag[0 if w in SHAPES else 1] = w
    return {img: (t[0], t[1]) for img, t in tags.items()}


def split_words(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word/punctuation lists of ``texts`` (the tokenizer's pre-tokenisation)."""
    return [_WORD_RE.findall(t.lower()) for t in texts]


def stack_pixel_values(image_processor, images: Sequence[Image.Image], chunk: int = 500) -> torch.Tensor:
    """Run ``image_processor`` over ``images`` in chunks and concatenate ``pixel_values``.

    Returns:
        LLaVA: ``[N, 3, H, W]`` float32. (Qwen2.5-VL processors return flattened patches; use them
        per image instead.)
    """
    parts = []
    for start in range(0, len(images), chunk):
        out = image_processor(images=list(images[start : start + chunk]), return_tensors="pt")
        parts.append(out["pixel_values"])
    return torch.cat(parts)
