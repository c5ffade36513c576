"""Tiny random-weight VLMs, a local tokenizer and local processors, for tests (no network).

One tiny model per registered architecture whose :class:`~tokenreduce.core.arch.ArchSpec`
builds one (:data:`KINDS`, named by ``config.model_type``); the config, the processor, the test
image size and the chat template come from the architecture's folder
(``tokenreduce/adapters/<arch>/tiny.py``).  Shared here: the word-level tokenizer and its special
tokens (:data:`SPECIAL_TOKENS`, the same ids for every architecture), the weight initialisation
and the test pictures.  The architectures' facts: ``docs/writing-an-adapter.md``.

Weights are random but deterministic for a given seed, and re-initialised with a large standard
deviation (0.2) so that attention is peaked and different tokens give different hidden states and
logits (the stock ``initializer_range=0.02`` gives nearly uniform attention and a greedy decode that
repeats one token).

Typical use::

    for kind in KINDS:
        model = build_tiny(kind)
        inputs = make_inputs(kind, ["USER: <image> what color is the shape? ASSISTANT:"])
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from tokenreduce.core.arch import ArchSpec, TinyCommon
from tokenreduce.core.errors import UnknownComponentError
from tokenreduce.core.registry import get_registry

# also KINDS, CHAT_TEMPLATES and QWEN_IMAGE_PLACEHOLDER, computed from the registry on use (__getattr__)
__all__ = [
    "TINY",
    "SPECIAL_TOKENS",
    "IMAGE_TOKEN_ID",
    "IMAGE_PAD_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "VIDEO_PAD_TOKEN_ID",
    "PAD_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "make_tokenizer",
    "save_tiny_checkpoint",
    "tiny_spec",
    "tiny_config",
    "llava_config",
    "llava_next_config",
    "qwen2_5_vl_config",
    "build_tiny",
    "make_processor",
    "make_image",
    "make_inputs",
]

#: Special tokens, in id order: ``<unk>``=0, ``<pad>``=1, ``<s>``=2, ``</s>``=3, ``<image>``=4,
#: ``<|vision_start|>``=5, ``<|vision_end|>``=6, ``<|image_pad|>``=7, ``<|video_pad|>``=8.
SPECIAL_TOKENS = (
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: what every tiny model shares: these special tokens, a vocabulary of 1000, weights drawn with std 0.2
TINY = TinyCommon(SPECIAL_TOKENS, vocab_size=1000, init_std=0.2)
PAD_TOKEN_ID = TINY.pad_id
BOS_TOKEN_ID = TINY.bos_id
EOS_TOKEN_ID = TINY.eos_id
IMAGE_TOKEN_ID = TINY.id("<image>")  # LLaVA / LLaVA-NeXT image placeholder
VISION_START_TOKEN_ID = TINY.id("<|vision_start|>")
VISION_END_TOKEN_ID = TINY.id("<|vision_end|>")
IMAGE_PAD_TOKEN_ID = TINY.id("<|image_pad|>")  # Qwen2.5-VL image placeholder
VIDEO_PAD_TOKEN_ID = TINY.id("<|video_pad|>")

_COLORS = ("red", "green", "blue", "yellow", "gray", "black", "white", "teal", "brown", "orange", "purple")
_SHAPES = ("circle", "square", "triangle", "rectangle")

_CORPUS = (
    "USER: what is in the image? ASSISTANT: a red circle",
    "USER: what shape is it? ASSISTANT: triangle square circle rectangle",
    "what color is the shape? " + " ".join(_COLORS),
    "does the image contain a circle? yes no",
    "which where when who why how many much are there any of this that these those",
    "is it a an the on in at to and or not left right top bottom middle center background",
    "describe picture photo object objects one two three four five big small large color colors shape shapes",
    "circles squares triangles rectangles images pictures ellipse oval dark light bright",
    "Describe the picture . Answer with one word , please !",
)


# ---------------------------------------------------------------------------------------------
# tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a small built-in corpus.

    Text is lowercased and split on whitespace and punctuation (``"Shape?"`` -> ``"shape"``, ``"?"``). Special
    tokens have fixed ids (see :data:`SPECIAL_TOKENS`): ``<image>``=4, ``<|image_pad|>``=7, pad=1,
    bos=2, eos=3. Common prompt words (question words, colours, shapes, yes/no) are in the
    vocabulary, so prompts such as ``"USER: <image> what color is the shape? ASSISTANT:"`` have no
    ``<unk>``. The vocabulary (~110 entries) is smaller than the tiny models' ``vocab_size`` (1000);
    ids beyond it decode to nothing. ``padding_side`` is ``"left"``.

    Returns:
        a ``PreTrainedTokenizerFast`` returning ``input_ids`` and ``attention_mask`` (no
        ``token_type_ids``).
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # special tokens are not normalised
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(vocab_size=1000, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(list(_CORPUS), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=list(SPECIAL_TOKENS[4:]),
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.padding_side = "left"
    return hf_tok


# ---------------------------------------------------------------------------------------------
# the architectures


def _kinds() -> tuple[str, ...]:
    return tuple(spec.model_type for spec in get_registry().specs() if spec.has_tiny)


def __getattr__(name: str) -> Any:
    # computed on use, from the registry as it is then (plugins included)
    if name == "KINDS":
        return _kinds()
    if name == "QWEN_IMAGE_PLACEHOLDER":  # the image placeholder of a Qwen2.5-VL prompt
        from tokenreduce.adapters.qwen2_5_vl.spec import Qwen2_5_VLSpec

        return Qwen2_5_VLSpec.image_placeholder
    if name == "CHAT_TEMPLATES":
        return {spec.model_type: spec.tiny_chat_template for spec in get_registry().specs() if spec.has_tiny}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_spec(kind: str) -> ArchSpec:
    """The registered :class:`~tokenreduce.core.arch.ArchSpec` of tiny model ``kind``.

    Raises:
        UnknownComponentError: (a ``KeyError``) no registered architecture ``kind`` builds a
            tiny model; the message lists :data:`KINDS`.
    """
    registry = get_registry()
    if kind in registry.names("architecture"):
        spec = registry.spec_for(kind)
        if spec.has_tiny:
            return spec
    raise UnknownComponentError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(_kinds())}")


def tiny_config(kind: str, **kw: Any) -> Any:
    """The config of tiny model ``kind`` (``text_layers=...`` and the architecture's
    ``tiny_options``, e.g. ``image_size`` and ``patch`` for LLaVA-1.5)."""
    return tiny_spec(kind).tiny_config(TINY, **kw)


def llava_config(image_size: int = 56, patch: int = 14, text_layers: int = 4, **text_kw: Any) -> Any:
    """Config of the tiny LLaVA-1.5 (:func:`tiny_config`; ``text_kw``: decoder sizes)."""
    from tokenreduce.adapters.llava.spec import LlavaSpec

    return tiny_config(LlavaSpec.model_type, image_size=image_size, patch=patch, text_layers=text_layers, **text_kw)


def llava_next_config(image_size: int = 56, patch: int = 14, text_layers: int = 4, **text_kw: Any) -> Any:
    """Config of the tiny LLaVA-NeXT (``image_size`` must stay 56 for its pinpoints)."""
    from tokenreduce.adapters.llava_next.spec import LlavaNextSpec

    return tiny_config(LlavaNextSpec.model_type, image_size=image_size, patch=patch, text_layers=text_layers, **text_kw)


def qwen2_5_vl_config(text_layers: int = 4, vocab_size: int = 1000) -> Any:
    """Config of the tiny Qwen2.5-VL."""
    from tokenreduce.adapters.qwen2_5_vl.spec import Qwen2_5_VLSpec

    return tiny_config(Qwen2_5_VLSpec.model_type, text_layers=text_layers, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------
# models


@torch.no_grad()
def _reinit_(model: nn.Module, std: float) -> None:
    """Draw every ``nn.Linear`` and ``nn.Embedding`` weight from N(0, std^2) (global RNG), in module order.

    Biases, norms and convolutions keep their default initialisation. Tied weights are drawn once
    (the parameter set is deduplicated by identity).
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            module.weight.normal_(0.0, std)


def build_tiny(
    kind: str,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **kw: Any,
) -> PreTrainedModel:
    """Build a tiny random-weight VLM in eval mode, deterministically from ``seed``.

    The global RNG state of the caller is left untouched (the build runs under
    ``torch.random.fork_rng``).

    Args:
        kind: one of :data:`KINDS`.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (``"flash_attention_2"`` needs CUDA).
        dtype: parameter dtype (use fp32 on CPU).
        seed: weight seed; the same seed gives bit-identical weights.
        **kw: forwarded to the config builder (:func:`tiny_config`: ``text_layers=4``, the
            architecture's ``tiny_options``).

    Returns:
        the architecture's ``transformers`` model class on CPU, in eval mode.
    """
    spec = tiny_spec(kind)
    config = spec.tiny_config(TINY, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class()._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        _reinit_(model, TINY.init_std)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# processors


def make_processor(kind: str, tokenizer: PreTrainedTokenizerFast | None = None, **options: Any) -> ProcessorMixin:
    """A local processor for ``kind`` built around :func:`make_tokenizer` (left padding).

    ``options``: the architecture's ``tiny_options`` (LLaVA-1.5: ``image_size`` and ``patch``,
    to match the model's).  What each processor does: the ``tiny_processor`` of the
    architecture's spec.
    """
    tok = tokenizer if tokenizer is not None else make_tokenizer()
    tok.padding_side = "left"
    return tiny_spec(kind).tiny_processor(tok, **options)


# ---------------------------------------------------------------------------------------------
# images and inputs


def make_image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A deterministic RGB image: one coloured shape on a plain background, varying with ``seed``.

    Args:
        seed: selects background colour, shape (circle, square, triangle, rectangle), shape colour
            and placement.
        size: ``(width, height)`` in pixels (PIL convention).

    Returns:
        a ``PIL.Image.Image`` in mode ``"RGB"``.
    """
    rng = random.Random(seed)
    width, height = size
    background = tuple(rng.randrange(256) for _ in range(3))
    color = tuple((c + 64 + rng.randrange(128)) % 256 for c in background)  # differs from the background
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    w = max(4, int(width * rng.uniform(0.3, 0.6)))
    h = max(4, int(height * rng.uniform(0.3, 0.6)))
    x0 = rng.randrange(0, max(1, width - w))
    y0 = rng.randrange(0, max(1, height - h))
    box = (x0, y0, x0 + w, y0 + h)
    shape = _SHAPES[rng.randrange(len(_SHAPES))]
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        s = min(w, h)
        draw.rectangle((x0, y0, x0 + s, y0 + s), fill=color)
    elif shape == "triangle":
        draw.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


def make_inputs(
    kind: str,
    prompts: Sequence[str],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    processor: ProcessorMixin | None = None,
) -> BatchFeature:
    """Processor inputs for a batch of prompts, one image per prompt, left-padded.

    Prompts mark the image with ``"<image>"`` for every kind; an architecture with another
    placeholder (Qwen2.5-VL: ``<|vision_start|><|image_pad|><|vision_end|>``) has it substituted
    in prompts that do not hold it already, so the same prompts serve all kinds.

    Args:
        kind: one of :data:`KINDS`.
        prompts: B prompts, each with one or more image placeholders.
        image_sizes: one ``(width, height)`` pair per image, in order; defaults to the
            architecture's ``tiny_image_size`` (56x56 for LLaVA-1.5, 100x80 for LLaVA-NeXT and
            Qwen2.5-VL).  LLaVA-1.5 resizes every image to 56x56; the others give a
            size-dependent number of visual tokens.
        seed: image ``i`` is ``make_image(seed + i, image_sizes[i])``.
        processor: defaults to ``make_processor(kind)``.

    Returns:
        the processor's ``BatchFeature``: ``input_ids`` ``[B, S]`` int64 and ``attention_mask``
        ``[B, S]`` int64 (left padding), plus ``pixel_values`` (LLaVA ``[B, 3, 56, 56]``;
        LLaVA-NeXT ``[B, n_patches, 3, 56, 56]`` and ``image_sizes`` ``[B, 2]``; Qwen2.5-VL
        ``[sum_patches, 1176]`` and ``image_grid_thw`` ``[B, 3]``).
    """
    spec = tiny_spec(kind)
    processor = processor if processor is not None else make_processor(kind)
    prompts = [spec.tiny_prompt(p) for p in prompts]
    per_prompt = [max(1, p.count(spec.image_placeholder)) for p in prompts]
    n_images = sum(per_prompt)
    if image_sizes is None:
        image_sizes = [spec.tiny_image_size] * n_images
    if len(image_sizes) != n_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for {n_images} images in {len(prompts)} prompts")
    flat = [make_image(seed + i, tuple(size)) for i, size in enumerate(image_sizes)]
    if all(n == 1 for n in per_prompt):
        images: list[Any] = flat
    else:  # several images in a prompt: one list per prompt
        bounds = [sum(per_prompt[:i]) for i in range(len(per_prompt) + 1)]
        images = [flat[bounds[i] : bounds[i + 1]] for i in range(len(prompts))]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# checkpoints on disk


def save_tiny_checkpoint(folder, kind: str, chat_template: bool = True, text_layers: int = 3, seed: int = 0):
    """Save a tiny ``kind`` model and its processor into ``folder`` with ``save_pretrained``, the
    way a real checkpoint is laid out (``config.json``, ``model.safetensors``, tokenizer and
    processor files), optionally with the architecture's ``tiny_chat_template`` (in the style of
    the real checkpoints' own: llava-hf's ``USER: ... ASSISTANT:`` turn, Qwen's ChatML).  Returns
    ``folder``.
    """
    spec = tiny_spec(kind)
    model = build_tiny(kind, text_layers=text_layers, seed=seed)
    processor = make_processor(kind)
    if chat_template and spec.tiny_chat_template is not None:
        processor.chat_template = spec.tiny_chat_template
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
