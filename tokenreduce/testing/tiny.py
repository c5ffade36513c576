"""Tiny random-weight VLMs, a local tokenizer and local processors, for tests (no network).

Three model kinds are supported, each named by its ``config.model_type``:

- ``"llava"``: LLaVA-1.5 (CLIP vision tower + Llama decoder). With the defaults (56 px images,
  14 px patches) an image gives ``(56 // 14) ** 2 = 16`` visual tokens (the CLS token is dropped by
  the ``"default"`` feature-selection strategy).
- ``"llava_next"``: LLaVA-NeXT anyres (grid pinpoints ``[[56, 112], [112, 56], [112, 112]]``). The
  number of visual tokens depends on the image size: base 16 + the unpadded high-resolution grid +
  one newline token per grid row (a 100x80 (w x h) image gives 70).
- ``"qwen2_5_vl"``: Qwen2.5-VL (windowed ViT with a 2x2 patch merger + Qwen2 decoder with 3-D mrope).
  A 100x80 (w x h) image becomes 6x8 = 48 patches of 14 px, i.e. 12 tokens after the 2x2 merge.

Weights are random but deterministic for a given seed, and re-initialised with a large standard
deviation (0.2) so that attention is peaked and different tokens give different hidden states and
logits (the stock ``initializer_range=0.02`` gives nearly uniform attention and a greedy decode that
repeats one token).

Typical use::

    model = build_tiny("llava")
    inputs = make_inputs("llava", ["USER: <image> what color is the shape? ASSISTANT:"])
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn

from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor
from transformers import (
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

__all__ = [
    "KINDS",
    "SPECIAL_TOKENS",
    "IMAGE_TOKEN_ID",
    "IMAGE_PAD_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "VIDEO_PAD_TOKEN_ID",
    "PAD_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "QWEN_IMAGE_PLACEHOLDER",
    "make_tokenizer",
    "CHAT_TEMPLATES",
    "save_tiny_checkpoint",
    "llava_config",
    "llava_next_config",
    "qwen2_5_vl_config",
    "build_tiny",
    "make_processor",
    "make_image",
    "make_inputs",
]

KINDS = ("llava", "llava_next", "qwen2_5_vl")

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
PAD_TOKEN_ID = 1
BOS_TOKEN_ID = 2
EOS_TOKEN_ID = 3
IMAGE_TOKEN_ID = 4  # LLaVA / LLaVA-NeXT image placeholder
VISION_START_TOKEN_ID = 5
VISION_END_TOKEN_ID = 6
IMAGE_PAD_TOKEN_ID = 7  # Qwen2.5-VL image placeholder
VIDEO_PAD_TOKEN_ID = 8

#: The image placeholder a Qwen2.5-VL prompt carries (the processor expands ``<|image_pad|>``).
QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

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

_LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
_INIT_STD = 0.2


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
# configs


def _llama_text_config(
    *,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    text_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 128,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=text_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        initializer_range=_INIT_STD,
    )


def _clip_vision_config(*, image_size: int, patch: int, hidden_size: int = 32, layers: int = 2) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden_size,
    )


def llava_config(image_size: int = 56, patch: int = 14, text_layers: int = 4, **text_kw) -> LlavaConfig:
    """Config of a tiny LLaVA-1.5: 2-layer CLIP (width 32) + ``text_layers``-layer Llama (width 64).

    Args:
        image_size: vision-tower input size in pixels (square).
        patch: patch size in pixels; an image gives ``(image_size // patch) ** 2`` visual tokens.
        text_layers: number of decoder layers.
        **text_kw: forwarded to the Llama text config builder (``vocab_size``, ``hidden_size``,
            ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``).
    """
    return LlavaConfig(
        vision_config=_clip_vision_config(image_size=image_size, patch=patch),
        text_config=_llama_text_config(text_layers=text_layers, **text_kw),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch) ** 2,
    )


def llava_next_config(image_size: int = 56, patch: int = 14, text_layers: int = 4, **text_kw) -> LlavaNextConfig:
    """Config of a tiny LLaVA-NeXT (anyres, grid pinpoints ``[[56, 112], [112, 56], [112, 112]]``).

    Same towers as :func:`llava_config`; ``image_size`` must stay 56 for the pinpoints to be
    multiples of it (the processor from :func:`make_processor` assumes 56).
    """
    return LlavaNextConfig(
        vision_config=_clip_vision_config(image_size=image_size, patch=patch),
        text_config=_llama_text_config(text_layers=text_layers, **text_kw),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=(image_size // patch) ** 2,
    )


def qwen2_5_vl_config(text_layers: int = 4, vocab_size: int = 1000) -> Qwen2_5_VLConfig:
    """Config of a tiny Qwen2.5-VL: 2-block windowed ViT (width 32, 14 px patches, 2x2 merge,
    window 56 px, block 1 full attention) + ``text_layers``-layer Qwen2 decoder (width 64, 4 heads,
    2 KV heads, head_dim 16).

    mrope needs ``head_dim == 2 * sum(mrope_section)``: 16 = 2 * (2 + 3 + 3).
    """
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        out_hidden_size=64,
        tokens_per_second=2,
        initializer_range=_INIT_STD,
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        initializer_range=_INIT_STD,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_PAD_TOKEN_ID,
        video_token_id=VIDEO_PAD_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
    )


# ---------------------------------------------------------------------------------------------
# models

_CONFIG_BUILDERS = {"llava": llava_config, "llava_next": llava_next_config, "qwen2_5_vl": qwen2_5_vl_config}
_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


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
    **kw,
) -> PreTrainedModel:
    """Build a tiny random-weight VLM in eval mode, deterministically from ``seed``.

    The global RNG state of the caller is left untouched (the build runs under
    ``torch.random.fork_rng``).

    Args:
        kind: ``"llava"``, ``"llava_next"`` or ``"qwen2_5_vl"``.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (``"flash_attention_2"`` needs CUDA).
        dtype: parameter dtype (use fp32 on CPU).
        seed: weight seed; the same seed gives bit-identical weights.
        **kw: forwarded to the config builder (e.g. ``text_layers=4``; for LLaVA ``image_size``
            and ``patch``).

    Returns:
        a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
        ``Qwen2_5_VLForConditionalGeneration`` on CPU, in eval mode.
    """
    if kind not in _CONFIG_BUILDERS:
        raise KeyError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    config = _CONFIG_BUILDERS[kind](**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[kind]._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        _reinit_(model, _INIT_STD)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# processors


def make_processor(
    kind: str, tokenizer: PreTrainedTokenizerFast | None = None, image_size: int = 56, patch: int = 14
) -> ProcessorMixin:
    """A local processor for ``kind`` built around :func:`make_tokenizer` (left padding).

    - ``"llava"``: ``LlavaProcessor`` with the PIL ``LlavaImageProcessorPil`` (resize shortest edge
      to ``image_size``, centre-crop); ``<image>`` expands to ``(image_size // patch) ** 2``
      placeholder tokens (16 at the default 56 px / patch 14).  Match the model's
      ``llava_config(image_size=..., patch=...)``.
    - ``"llava_next"``: ``LlavaNextProcessor`` with ``LlavaNextImageProcessorPil`` (anyres, base
      56 px, pinpoints ``[[56, 112], [112, 56], [112, 112]]``); ``<image>`` expands to the number of
      visual tokens of that image size.
    - ``"qwen2_5_vl"``: an image-only ``Qwen2_5_VLProcessor`` (the video processor needs
      torchvision, which has no CPU wheel) with ``Qwen2VLImageProcessorPil`` (56^2 to 112^2 pixels,
      14 px patches, 2x2 merge); ``<|image_pad|>`` expands to the number of merged tokens.
    """
    tok = tokenizer if tokenizer is not None else make_tokenizer()
    tok.padding_side = "left"
    if kind == "llava":
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=patch,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        )
    if kind == "llava_next":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 56},
            crop_size={"height": 56, "width": 56},
            image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    if kind == "qwen2_5_vl":
        from transformers import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok)
    raise KeyError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")


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


_DEFAULT_IMAGE_SIZE = {"llava": (56, 56), "llava_next": (100, 80), "qwen2_5_vl": (100, 80)}


def make_inputs(
    kind: str,
    prompts: Sequence[str],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    processor: ProcessorMixin | None = None,
) -> BatchFeature:
    """Processor inputs for a batch of prompts, one image per prompt, left-padded.

    Prompts mark the image with ``"<image>"`` for every kind; for ``"qwen2_5_vl"`` a prompt without
    ``<|image_pad|>`` has its ``"<image>"`` replaced by :data:`QWEN_IMAGE_PLACEHOLDER`
    (``<|vision_start|><|image_pad|><|vision_end|>``), so the same prompts serve all kinds.

    Args:
        kind: ``"llava"``, ``"llava_next"`` or ``"qwen2_5_vl"``.
        prompts: B prompts, each with one or more image placeholders.
        image_sizes: one ``(width, height)`` pair per image, in order; defaults to 56x56 for LLaVA and 100x80 for
            LLaVA-NeXT and Qwen2.5-VL. LLaVA resizes every image to 56x56; the others give a
            size-dependent number of visual tokens.
        seed: image ``i`` is ``make_image(seed + i, image_sizes[i])``.
        processor: defaults to ``make_processor(kind)``.

    Returns:
        the processor's ``BatchFeature``: ``input_ids`` ``[B, S]`` int64 and ``attention_mask``
        ``[B, S]`` int64 (left padding), plus ``pixel_values`` (LLaVA ``[B, 3, 56, 56]``;
        LLaVA-NeXT ``[B, n_patches, 3, 56, 56]`` and ``image_sizes`` ``[B, 2]``; Qwen2.5-VL
        ``[sum_patches, 1176]`` and ``image_grid_thw`` ``[B, 3]``).
    """
    if kind not in _CONFIG_BUILDERS:
        raise KeyError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    processor = processor if processor is not None else make_processor(kind)
    prompts = list(prompts)
    per_prompt = [max(1, p.count("<image>") + p.count("<|image_pad|>")) for p in prompts]
    n_images = sum(per_prompt)
    if image_sizes is None:
        image_sizes = [_DEFAULT_IMAGE_SIZE[kind]] * n_images
    if len(image_sizes) != n_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for {n_images} images in {len(prompts)} prompts")
    if kind == "qwen2_5_vl":
        prompts = [p if "<|image_pad|>" in p else p.replace("<image>", QWEN_IMAGE_PLACEHOLDER) for p in prompts]
    flat = [make_image(seed + i, tuple(size)) for i, size in enumerate(image_sizes)]
    if all(n == 1 for n in per_prompt):
        images = flat
    else:  # several images in a prompt: one list per prompt
        bounds = [sum(per_prompt[:i]) for i in range(len(per_prompt) + 1)]
        images = [flat[bounds[i] : bounds[i + 1]] for i in range(len(prompts))]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# checkpoints on disk

#: Chat templates in the style of each real checkpoint's own (the llava-hf ``USER: ... ASSISTANT:``
#: turn, Qwen's ChatML with a system prompt), for tiny checkpoints whose processors have none.
CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
CHAT_TEMPLATES["llava_next"] = CHAT_TEMPLATES["llava"]


def save_tiny_checkpoint(folder, kind: str, chat_template: bool = True, text_layers: int = 3, seed: int = 0):
    """Save a tiny ``kind`` model and its processor into ``folder`` with ``save_pretrained``, the
    way a real checkpoint is laid out (``config.json``, ``model.safetensors``, tokenizer and
    processor files), optionally with a chat template (:data:`CHAT_TEMPLATES`).  Returns ``folder``.
    """
    model = build_tiny(kind, text_layers=text_layers, seed=seed)
    processor = make_processor(kind)
    if chat_template:
        processor.chat_template = CHAT_TEMPLATES[kind]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
