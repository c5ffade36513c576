"""Architectures and processors of the easy-VQA reference models, built in code from
:class:`ArchSettings`: a LLaVA (CLIP tower with CLS, Llama decoder) or a Qwen2.5-VL (windowed ViT
with a 2x2 patch merger, Qwen2 decoder with M-RoPE), both plain Hugging Face classes.
See ``tools/reference/TRAINING.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
)

from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor
from tokenreduce.core.registry import get_registry
from tokenreduce.reference import data

__all__ = [
    "ARCHS",
    "ArchSettings",
    "model_config",
    "build_model",
    "make_processor",
    "ImageOnlyQwen2_5_VLProcessor",
    "num_visual_tokens",
]

ARCHS = ("llava", "qwen2_5_vl")

Arch = Literal["llava", "qwen2_5_vl"]


class ArchSettings(BaseModel):
    """Sizes of a reference model. Defaults are the shipped LLaVA reference model.

    Vision tower: ``image_size`` px input, ``patch`` px patches, ``vision_layers`` blocks of width
    ``vision_hidden`` (MLP ``2 * vision_hidden``). Language model: ``text_layers`` decoder layers of
    width ``text_hidden``, ``text_heads`` query heads (head_dim = ``text_hidden // text_heads``),
    ``text_kv_heads`` key/value heads, MLP width ``text_intermediate``. For Qwen2.5-VL the
    visual tokens are merged 2x2, so a ``image_size`` image gives ``(image_size // patch // 2) ** 2``
    tokens, and head_dim must be a multiple of 8 (M-RoPE sections).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch = "llava"
    image_size: int = Field(96, gt=0)
    patch: int = Field(8, gt=0)
    vision_hidden: int = Field(64, gt=0)
    vision_layers: int = Field(3, gt=0)
    vision_heads: int = Field(4, gt=0)
    text_hidden: int = Field(128, gt=0)
    text_layers: int = Field(4, gt=0)
    text_heads: int = Field(4, gt=0)
    text_kv_heads: int = Field(4, gt=0)
    text_intermediate: int = Field(256, gt=0)
    vocab_size: int = Field(64, gt=len(data.SPECIAL_TOKENS))
    initializer_range: float = Field(0.02, gt=0)
    rope_theta: float = Field(
        10000.0,
        gt=0,
        description="RoPE base of the LLaVA decoder (Llama's 10,000 by default); a larger base keeps more of a "
        "small head's rotary pairs slow enough to match content across the 576 visual tokens (TRAINING.md)",
    )

    @model_validator(mode="after")
    def _check(self) -> ArchSettings:
        merge = 2 if self.arch == "qwen2_5_vl" else 1
        if self.image_size % (self.patch * merge):
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch * merge ({self.patch} * {merge})"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"vision_hidden ({self.vision_hidden}) must be divisible by vision_heads ({self.vision_heads})"
            )
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden ({self.text_hidden}) must be divisible by text_heads ({self.text_heads})")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(
                f"text_heads ({self.text_heads}) must be divisible by text_kv_heads ({self.text_kv_heads})"
            )
        if self.arch == "qwen2_5_vl" and self.rope_theta != 10000.0:
            raise ValueError(
                f"rope_theta ({self.rope_theta}) applies to the LLaVA decoder only; Qwen2.5-VL keeps its M-RoPE base"
            )
        if self.arch == "qwen2_5_vl" and (self.text_hidden // self.text_heads) % 8:
            raise ValueError(
                f"Qwen2.5-VL needs head_dim (text_hidden // text_heads = {self.text_hidden // self.text_heads}) "
                "to be a multiple of 8 (M-RoPE sections)"
            )
        return self


def num_visual_tokens(settings: ArchSettings) -> int:
    """Visual tokens one image gives in the language model."""
    grid = settings.image_size // settings.patch
    if settings.arch == "qwen2_5_vl":
        grid //= 2
    return grid * grid


def _llava_config(s: ArchSettings) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch,
        projection_dim=s.vision_hidden,
        initializer_range=s.initializer_range,
    )
    text = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.text_hidden,
        intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=512,
        pad_token_id=data.PAD_TOKEN_ID,
        bos_token_id=data.BOS_TOKEN_ID,
        eos_token_id=data.EOS_TOKEN_ID,
        initializer_range=s.initializer_range,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=data.IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=num_visual_tokens(s),
        pad_token_id=data.PAD_TOKEN_ID,
        bos_token_id=data.BOS_TOKEN_ID,
        eos_token_id=data.EOS_TOKEN_ID,
        tie_word_embeddings=False,
    )


def _qwen2_5_vl_config(s: ArchSettings) -> Qwen2_5_VLConfig:
    head_dim = s.text_hidden // s.text_heads
    half = head_dim // 2  # rotary pairs, split over (temporal, height, width)
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    grid = s.image_size // s.patch
    vision = dict(
        depth=s.vision_layers,
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_heads=s.vision_heads,
        in_channels=3,
        patch_size=s.patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=s.patch * grid // 2 if grid >= 4 else s.patch * 2,  # windows of half the image side
        fullatt_block_indexes=[s.vision_layers - 1],
        out_hidden_size=s.text_hidden,
        tokens_per_second=2,
        initializer_range=s.initializer_range,
    )
    text = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.text_hidden,
        intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=512,
        bos_token_id=data.BOS_TOKEN_ID,
        eos_token_id=data.EOS_TOKEN_ID,
        pad_token_id=data.PAD_TOKEN_ID,
        initializer_range=s.initializer_range,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "rope_theta": 10000.0},
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=data.IMAGE_PAD_TOKEN_ID,
        video_token_id=data.VIDEO_PAD_TOKEN_ID,
        vision_start_token_id=data.VISION_START_TOKEN_ID,
        vision_end_token_id=data.VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )


def model_config(settings: ArchSettings) -> LlavaConfig | Qwen2_5_VLConfig:
    """The Hugging Face config of a reference model with these sizes."""
    return _llava_config(settings) if settings.arch == "llava" else _qwen2_5_vl_config(settings)


def build_model(settings: ArchSettings, seed: int = 0, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised fp32 reference model on CPU (train mode), deterministic in ``seed``.

    The caller's global RNG state is left untouched.
    """
    config = model_config(settings)
    cls = get_registry().spec_for(settings.arch).model_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = data.PAD_TOKEN_ID
    model.generation_config.bos_token_id = data.BOS_TOKEN_ID
    model.generation_config.eos_token_id = data.EOS_TOKEN_ID
    model.generation_config.do_sample = False
    return model.train()


def make_processor(settings: ArchSettings, tokenizer: PreTrainedTokenizerFast | None = None) -> ProcessorMixin:
    """The processor of a reference model: resizes the image to ``image_size`` square, normalises
    it like CLIP, and expands the prompt's image placeholder to :func:`num_visual_tokens` tokens.

    Args:
        settings: the model sizes (``arch``, ``image_size``, ``patch``).
        tokenizer: defaults to :func:`tokenreduce.reference.data.make_tokenizer` (left padding).
    """
    tok = tokenizer if tokenizer is not None else data.make_tokenizer()
    size = settings.image_size
    if settings.arch == "llava":
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=settings.patch,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        )
    from transformers import Qwen2VLImageProcessorPil

    pixels = size * size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels,
        max_pixels=pixels,
        patch_size=settings.patch,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok)
